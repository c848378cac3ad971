"""safereset: account recovery built on explicit state machines."""

__version__ = "0.1.0"
