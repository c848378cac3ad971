"""Mail: composing messages from templates, the outbox worker and its transports."""
