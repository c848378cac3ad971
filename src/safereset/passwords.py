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
    """No hashing slot came free in time, so the caller should respond 503 and retry later."""


class HashGate:
    """Bounds how many Argon2id computations run at once, and how many wait for one.

    Each computation takes 64 MiB and about 0.1 s of a core, so an unbounded
    number of password requests would exhaust memory and delay everything
    else. A request that finds every slot taken waits up to ``wait_seconds``
    for one, if fewer than ``waiting`` requests wait already. Otherwise, or
    when the wait runs out, it fails with ``HashingBusy``. A short queue
    absorbs a burst that would only have to come back a second later, and
    the limit on it keeps a flood from tying up the server's threads.
    """

    def __init__(self, slots: int, waiting: int = 0, wait_seconds: float = 2.0) -> None:
        if slots < 1:
            raise ValueError(f"hashing slots must be at least 1, got {slots}")
        if waiting < 0:
            raise ValueError(f"waiting requests must be at least 0, got {waiting}")
        if wait_seconds <= 0:
            raise ValueError(f"the wait for a slot must be positive, got {wait_seconds}")
        self._slots = threading.BoundedSemaphore(slots)
        self._waiting = threading.BoundedSemaphore(waiting) if waiting else None
        self.wait_seconds = wait_seconds

    def check_free(self) -> None:
        """Raise ``HashingBusy`` if every slot and every place to wait is taken now.

        Callers check before their database work, so that a request which
        would be turned away costs no queries. It reserves nothing: a place
        free now may be taken by the time the caller hashes.
        """
        if self._slots.acquire(blocking=False):
            self._slots.release()
            return
        if self._waiting is not None and self._waiting.acquire(blocking=False):
            self._waiting.release()
            return
        raise HashingBusy

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            self._wait_for_slot()
        try:
            yield
        finally:
            self._slots.release()

    def _wait_for_slot(self) -> None:
        if self._waiting is None or not self._waiting.acquire(blocking=False):
            raise HashingBusy
        try:
            if not self._slots.acquire(timeout=self.wait_seconds):
                raise HashingBusy
        finally:
            self._waiting.release()


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
