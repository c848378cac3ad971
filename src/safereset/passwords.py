"""Password hashing (Argon2id) and the password policy."""

from __future__ import annotations

import contextlib
import threading
import unicodedata
from collections.abc import Iterator

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# Length rules of NIST SP 800-63B section 5.1.1.2: at least 8 characters, no
# composition rules. The upper bound keeps one hash cheap to request.
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


class PasswordRejected(ValueError):
    """A new password fails the policy; the message gives the reason."""


def check_policy(password: str, email: str | None) -> None:
    """Raise ``PasswordRejected`` unless ``password`` may be set for ``email``.

    With ``email`` None only the length rules apply, for a check that must not
    depend on whether an account exists.
    """
    length = len(unicodedata.normalize("NFC", password))
    if length < MIN_PASSWORD_LENGTH:
        raise PasswordRejected(f"password must be at least {MIN_PASSWORD_LENGTH} characters long")
    if length > MAX_PASSWORD_LENGTH:
        raise PasswordRejected(f"password must be at most {MAX_PASSWORD_LENGTH} characters long")
    if email is not None and fold(password) == fold(email):
        raise PasswordRejected("password must not be the account's email address")


def fold(text: str) -> str:
    """Fold case and Unicode compatibility forms, so equal-looking texts compare equal."""
    return unicodedata.normalize("NFKC", text).casefold()


class HashingBusy(Exception):
    """Every hashing slot is taken, so the caller should respond 503 and retry later."""


class HashGate:
    """Bounds how many Argon2id computations run at once.

    Each one takes 64 MiB and about 0.1 s of a core, so an unbounded number of
    password requests would exhaust memory and delay everything else. A
    request that finds every slot taken fails at once with ``HashingBusy``
    instead of queueing without limit.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"hashing slots must be at least 1, got {slots}")
        self._slots = threading.BoundedSemaphore(slots)

    def check_free(self) -> None:
        """Raise ``HashingBusy`` if every slot is taken at this moment.

        Callers check before their database work, so that a request which
        would be turned away costs no queries. It reserves nothing: a slot
        free now may be taken by the time the caller hashes.
        """
        with self.slot():
            pass

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise HashingBusy
        try:
            yield
        finally:
            self._slots.release()


class Hasher:
    """Argon2id with RFC 9106's low-memory parameters (t=3, m=64 MiB, p=4).

    They exceed OWASP's minimum for Argon2id (m=19 MiB, t=2, p=1). The
    parameters are kept in each hash string, so raising them later works:
    ``needs_rehash`` reports when the caller should store a new hash after a login.
    """

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self._hasher = hasher or PasswordHasher()
        # Verified against when the user is unknown, so a login for an
        # unknown address costs one hash like a login for a known one.
        self._dummy_hash = self._hasher.hash("safereset-dummy-password")

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """Check ``password``; with no stored hash, spend the same time and fail."""
        try:
            self._hasher.verify(stored_hash or self._dummy_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)
