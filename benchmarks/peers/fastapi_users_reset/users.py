"""The fastapi-users pieces: password hashing, the user manager and the JWT backend."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from db import User
from fastapi import Request
from fastapi_users import BaseUserManager, InvalidPasswordException, UUIDIDMixin, schemas
from fastapi_users.authentication import AuthenticationBackend, BearerTransport, JWTStrategy
from fastapi_users.password import PasswordHelper
from fastapi_users_db_sqlalchemy import SQLAlchemyUserDatabase
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

# Fixed secrets because this application only serves benchmarks on loopback.
# A real deployment loads random secrets from its configuration. Each is at
# least 32 bytes, or PyJWT warns that the HMAC-SHA256 key is too short.
RESET_PASSWORD_TOKEN_SECRET = "benchmark-only-reset-password-token-secret"  # noqa: S105
VERIFICATION_TOKEN_SECRET = "benchmark-only-verification-token-secret"  # noqa: S105
JWT_SECRET = "benchmark-only-jwt-access-token-secret"  # noqa: S105
JWT_LIFETIME_SECONDS = 3600

# The same minimum that safereset enforces.
MIN_PASSWORD_LENGTH = 8

# Argon2id with RFC 9106's low-memory parameters (t=3, m=64 MiB, p=4), the ones
# safereset uses. The library's default helper also accepts bcrypt hashes, but
# this one accepts Argon2 only, since every stored hash is Argon2id.
password_helper = PasswordHelper(
    PasswordHash(
        (Argon2Hasher(time_cost=3, memory_cost=65536, parallelism=4, hash_len=32, salt_len=16),)
    )
)


class UserManager(UUIDIDMixin, BaseUserManager[User, uuid.UUID]):
    reset_password_token_secret = RESET_PASSWORD_TOKEN_SECRET
    verification_token_secret = VERIFICATION_TOKEN_SECRET

    def __init__(self, user_db: SQLAlchemyUserDatabase[User, uuid.UUID], mail_dir: Path) -> None:
        super().__init__(user_db, password_helper)
        self.mail_dir = mail_dir

    async def validate_password(self, password: str, user: schemas.UC | User) -> None:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise InvalidPasswordException(
                reason=f"Password should be at least {MIN_PASSWORD_LENGTH} characters"
            )

    async def on_after_forgot_password(
        self, user: User, token: str, request: Request | None = None
    ) -> None:
        write_reset_mail(self.mail_dir, user.email, token)


def write_reset_mail(mail_dir: Path, address: str, token: str) -> Path:
    """Write one reset message into its own file, in place of sending it.

    The message goes to a temporary name first and is renamed, so no reader of
    the folder finds half a file.
    """
    name = uuid.uuid4().hex
    message = (
        f"To: {address}\n"
        "Subject: Reset your password\n"
        "\n"
        "Open this link to choose a new password:\n"
        f"http://127.0.0.1/reset?token={token}\n"
    )
    partial = mail_dir / f".{name}.tmp"
    partial.write_text(message, encoding="utf-8")
    path = mail_dir / f"{name}.eml"
    os.replace(partial, path)
    return path


def get_jwt_strategy() -> JWTStrategy[User, uuid.UUID]:
    return JWTStrategy(secret=JWT_SECRET, lifetime_seconds=JWT_LIFETIME_SECONDS)


auth_backend = AuthenticationBackend(
    name="jwt",
    transport=BearerTransport(tokenUrl="auth/jwt/login"),
    get_strategy=get_jwt_strategy,
)
