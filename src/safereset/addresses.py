"""Email addresses: validation and the folded key that lookups use."""

from __future__ import annotations

from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from safereset.passwords import fold

MAX_ADDRESS_LENGTH = 320  # 64 for the local part, 1 for "@", 255 for the domain (RFC 5321)


class InvalidAddress(ValueError):
    """The text is not a usable email address; the message gives the reason."""


@dataclass(frozen=True)
class Address:
    normalized: str
    key: str


def parse_address(text: str) -> Address:
    """Validate ``text`` and return its normalized form and lookup key.

    The key folds case and Unicode compatibility forms of the whole address,
    so ``Alice@Example.com``, ``alice@example.com`` and the same address in
    fullwidth letters find the same account.
    Registering a second address with the same key is refused, so folding
    can never hand one user's mail to another.
    """
    if len(text) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"email address must be at most {MAX_ADDRESS_LENGTH} characters")
    try:
        valid = validate_email(text, check_deliverability=False)
    except EmailNotValidError as error:
        raise InvalidAddress(str(error)) from None
    return Address(normalized=valid.normalized, key=fold(valid.normalized))
