"""Settings, read from ``SAFERESET_*`` environment variables and checked at start-up."""

from __future__ import annotations

import ipaddress
import os
import secrets
from email.utils import parseaddr
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from safereset.throttle import Limits, Rate

SECRET_KEY_FILE = "secret.key"  # noqa: S105  # a file name, not a secret
# 32 bytes (256 bits) matches the strength of HMAC-SHA-256.
SECRET_KEY_MIN_BYTES = 32


class SettingsError(Exception):
    """The environment contains a setting that start-up cannot accept."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAFERESET_", extra="ignore")

    data_dir: Path = Field(
        default=Path("safereset-data"),
        description="Folder for the embedded defaults: database, secret key and mail.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default a SQLite file in the data folder."
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Base URL that links in mail start with; never taken from a request.",
    )
    secret_key: str | None = Field(
        default=None,
        description="Key for token digests and CSRF (at least 32 bytes); default generated.",
    )
    secret_keys: str | None = Field(
        default=None,
        description="Comma-separated keys for rotation: the first signs, every one verifies.",
    )
    mail_url: str | None = Field(
        default=None,
        description="smtp://, smtp+starttls://, smtps:// or file:// URL; default a folder.",
    )
    mail_from: str = Field(default="safereset <no-reply@localhost>")
    token_ttl_seconds: int = Field(default=1800, ge=60, le=86400)
    session_ttl_seconds: int = Field(default=43200, ge=60, le=2592000)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    run_worker: bool = Field(default=True, description="Deliver mail inside `safereset serve`.")
    worker_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    mail_lease_seconds: int = Field(
        default=120,
        ge=2,
        le=3600,
        description="How long a worker holds a message before another may take it over.",
    )
    smtp_timeout_seconds: float = Field(
        default=30.0, gt=0, le=600, description="Timeout of one SMTP delivery attempt."
    )
    code_ttl_seconds: int = Field(default=600, ge=60, le=3600)
    max_concurrent_hashes: int = Field(
        default=0, ge=0, le=1024, description="Argon2id computations at once; 0: one per core."
    )
    hash_queue_size: int | None = Field(
        default=None,
        ge=0,
        le=4096,
        description="Requests that may wait for a hashing slot; default four per slot, 0: none.",
    )
    hash_wait_seconds: float = Field(
        default=2.0, gt=0, le=30, description="How long a request waits for a hashing slot."
    )
    trusted_proxies: str = Field(
        default="",
        description="Comma-separated addresses or networks whose X-Forwarded-For is believed.",
    )
    limit_recovery_per_client: str = "10/15m"
    limit_recovery_per_address: str = "5/1h"
    limit_completion_per_client: str = "20/15m"
    limit_login_per_account: str = "10/15m"
    limit_login_per_client: str = "50/15m"
    limit_mail_per_account: str = "10/1d"
    db_pool_size: int = Field(default=5, ge=1, le=100)
    db_max_overflow: int = Field(default=10, ge=0, le=100)
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _check_lease_outlasts_delivery(self) -> Settings:
        # A lease that ends while its worker still talks to the SMTP server
        # lets a second worker send the same mail.
        if self.mail_lease_seconds <= self.smtp_timeout_seconds + 1:
            raise ValueError(
                "mail_lease_seconds: must exceed SAFERESET_SMTP_TIMEOUT_SECONDS "
                f"({self.smtp_timeout_seconds:g}) by more than 1 second"
            )
        return self

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not contain a query or a fragment")
        if parts.path not in ("", "/"):
            # The pages, cookies and redirects use root paths.
            raise ValueError("must not contain a path; serve safereset at the root of its host")
        return value.rstrip("/")

    @field_validator("mail_from")
    @classmethod
    def _check_mail_from(cls, value: str) -> str:
        # Only the shape is checked: sender domains such as "localhost" are
        # legitimate here although no public mail system would accept them.
        _display_name, address = parseaddr(value)
        local, _, domain = address.rpartition("@")
        if not local or not domain or any(char.isspace() for char in address):
            raise ValueError("must be an address such as 'safereset <no-reply@example.com>'")
        return value

    @field_validator(
        "limit_recovery_per_client",
        "limit_recovery_per_address",
        "limit_completion_per_client",
        "limit_login_per_account",
        "limit_login_per_client",
        "limit_mail_per_account",
    )
    @classmethod
    def _check_rate(cls, value: str) -> str:
        Rate.parse(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @property
    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        parts = (part.strip() for part in self.trusted_proxies.split(","))
        return tuple(ipaddress.ip_network(part, strict=False) for part in parts if part)

    @property
    def limits(self) -> Limits:
        return Limits(
            recovery_per_client=Rate.parse(self.limit_recovery_per_client),
            recovery_per_address=Rate.parse(self.limit_recovery_per_address),
            completion_per_client=Rate.parse(self.limit_completion_per_client),
            login_per_account=Rate.parse(self.limit_login_per_account),
            login_per_client=Rate.parse(self.limit_login_per_client),
            mail_per_account=Rate.parse(self.limit_mail_per_account),
        )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) < SECRET_KEY_MIN_BYTES:
            raise ValueError(f"must be at least {SECRET_KEY_MIN_BYTES} bytes long")
        return value

    @field_validator("secret_keys")
    @classmethod
    def _check_secret_keys(cls, value: str | None) -> str | None:
        if value is None:
            return None
        keys = [key.strip() for key in value.split(",")]
        if not all(keys):
            raise ValueError("must be comma-separated keys with none empty")
        for position, key in enumerate(keys, start=1):
            if len(key.encode()) < SECRET_KEY_MIN_BYTES:
                raise ValueError(
                    f"key {position} must be at least {SECRET_KEY_MIN_BYTES} bytes long"
                )
        return value

    @model_validator(mode="after")
    def _check_one_key_setting(self) -> Settings:
        if self.secret_key is not None and self.secret_keys is not None:
            raise ValueError(
                "secret_keys: set SAFERESET_SECRET_KEYS or SAFERESET_SECRET_KEY, not both"
            )
        return self

    @field_validator("mail_url")
    @classmethod
    def _check_mail_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "file":
            if not parts.path:
                raise ValueError("file:// URL needs a folder path")
        elif parts.scheme in ("smtp", "smtp+starttls", "smtps"):
            if not parts.hostname:
                raise ValueError("SMTP URL needs a host")
            try:
                parts.port  # noqa: B018  # parsing the port raises on a bad one
            except ValueError as error:
                raise ValueError(f"invalid port: {error}") from None
        else:
            raise ValueError("scheme must be smtp, smtp+starttls, smtps or file")
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'safereset.db'}"

    @property
    def resolved_mail_url(self) -> str:
        return self.mail_url or (self.data_dir / "outbox").resolve().as_uri()

    def load_secret_keys(self) -> list[bytes]:
        """Return the keys, the signing key first; with none set, the generated one."""
        if self.secret_keys is not None:
            return [key.strip().encode() for key in self.secret_keys.split(",")]
        return [self.load_secret_key()]

    def load_secret_key(self) -> bytes:
        """Return the secret key, creating and storing one on first run when none is set."""
        if self.secret_key is not None:
            return self.secret_key.encode()
        path = self.data_dir / SECRET_KEY_FILE
        if not path.exists():
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # O_EXCL: of two processes starting at once, only one writes a key.
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(descriptor, "w", encoding="ascii") as key_file:
                    key_file.write(secrets.token_urlsafe(48))
        key = path.read_text(encoding="ascii").strip()
        if len(key.encode()) < SECRET_KEY_MIN_BYTES:
            raise SettingsError(
                f"{path}: secret key is shorter than {SECRET_KEY_MIN_BYTES} bytes; "
                "delete the file to generate a new one or set SAFERESET_SECRET_KEY"
            )
        return key.encode()


def load_settings() -> Settings:
    """Read the settings, turning validation errors into one message per variable."""
    try:
        return Settings()
    except ValidationError as error:
        problems = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            if item["loc"]:
                field = str(item["loc"][0])
            else:
                # Checks across fields name their field at the start of the message.
                field, _, message = message.partition(": ")
            problems.append(f"SAFERESET_{field.upper()}: {message}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
