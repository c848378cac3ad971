"""Errors the use cases raise; the web layer maps each to one HTTP response."""

from __future__ import annotations

# Untrusted input. Each is one opaque error, so a caller learns nothing about
# which check failed.


class InvalidToken(Exception):
    """The recovery token is unknown, used, superseded, revoked or expired."""


class InvalidCode(Exception):
    """The recovery code is wrong, or its flow is unknown, expired, locked or used."""


class InvalidCredentials(Exception):
    """The email address and password do not identify an active account."""


class InvalidSession(Exception):
    """The session token is unknown, expired or revoked."""


# Operator and caller errors, with a precise message.


class UserExists(ValueError):
    """An account with this address (or one that folds to the same key) exists."""


class UserNotFound(LookupError):
    """No account has this address."""


class AccountDisabled(ValueError):
    """The operation needs an active account, and this one is disabled."""
