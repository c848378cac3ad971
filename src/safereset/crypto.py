"""Tokens, keyed digests and sealing: every use of the secret key.

Tokens are 256 random bits from ``secrets``. The database stores only a keyed
digest of each (HMAC-SHA-256), so a dump of it contains no usable token, and a
lookup by digest means no secret is ever compared with ``==``. Each purpose
derives its own key, so a digest made for one purpose never matches another.

Key rotation: the first key of the ring signs; the other keys are accepted for
verification only (lookups try each key's digest).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# A fixed prefix lets secret scanners recognise a leaked token.
TOKEN_PREFIX = "srt_"  # noqa: S105  # a public marker, not a secret
TOKEN_BYTES = 32  # 256 bits
TOKEN_PATTERN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{43}")
_NONCE_BYTES = 12  # the nonce size AES-GCM is defined for


class SealError(Exception):
    """A sealed value was altered, or sealed under a key that is no longer in the ring."""


def new_token() -> str:
    """Generate a URL-safe token of 256 random bits with the scanner prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def is_well_formed(token: str) -> bool:
    """Tell whether ``token`` has the shape of a token this service issues."""
    return TOKEN_PATTERN.fullmatch(token) is not None


class Keyring:
    """Derives purpose keys from the secret keys; the first key signs."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._keys = tuple(keys)

    def _derive(self, key: bytes, purpose: str) -> bytes:
        return hmac.new(key, b"safereset/" + purpose.encode(), hashlib.sha256).digest()

    def digest(self, purpose: str, value: str) -> str:
        """Return the digest of ``value`` under the signing key, as hex."""
        return self.digests(purpose, value)[0]

    def digests(self, purpose: str, value: str) -> list[str]:
        """Return the digest of ``value`` under every key, signing key first."""
        return [
            hmac.new(self._derive(key, purpose), value.encode(), hashlib.sha256).hexdigest()
            for key in self._keys
        ]

    def verify(self, purpose: str, value: str, digest: str) -> bool:
        """Compare in constant time against the digests under every key."""
        # Bytes, because compare_digest rejects str with non-ASCII characters
        # and ``digest`` may come straight from a form field.
        submitted = digest.encode("utf-8", "replace")
        found = False
        for candidate in self.digests(purpose, value):
            found |= hmac.compare_digest(candidate.encode("ascii"), submitted)
        return found

    def seal(self, purpose: str, plaintext: str, context: str) -> str:
        """Encrypt and authenticate ``plaintext``, bound to ``context`` (a record id)."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        cipher = AESGCM(self._derive(self._keys[0], purpose))
        sealed = cipher.encrypt(nonce, plaintext.encode(), context.encode())
        return base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def unseal(self, purpose: str, sealed: str, context: str) -> str:
        """Decrypt a value from ``seal``, trying every key of the ring."""
        try:
            raw = base64.urlsafe_b64decode(sealed.encode("ascii"))
        except ValueError:
            raise SealError("sealed value is not base64") from None
        nonce, ciphertext = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        for key in self._keys:
            try:
                plaintext = AESGCM(self._derive(key, purpose)).decrypt(
                    nonce, ciphertext, context.encode()
                )
            except InvalidTag:
                continue
            return plaintext.decode()
        raise SealError("no key in the ring opens this sealed value")
