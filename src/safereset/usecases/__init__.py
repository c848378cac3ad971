"""The use cases, one module per concern; ``safereset.service.Service`` combines them."""
