"""Mail transports: a folder of ``.eml`` files, or an SMTP server."""

from __future__ import annotations

import os
import tempfile
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib

# Long enough for a slow relay; the settings require the mail lease to outlast it.
DEFAULT_SMTP_TIMEOUT_SECONDS = 30.0


class TransportError(Exception):
    """The transport did not accept the message; the worker will retry."""


class Transport(Protocol):
    async def send(self, message: EmailMessage) -> None: ...

    def describe(self) -> str:
        """Return where mail goes, without credentials, for logs."""
        ...


class FolderTransport:
    """Writes each message to ``<Message-ID>.eml`` in a folder.

    The file appears whole or not at all (written to a temporary file, then
    renamed), and a message delivered twice overwrites its own file.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def send(self, message: EmailMessage) -> None:
        name = str(message["Message-ID"]).strip("<>").replace("/", "_") + ".eml"
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(message.as_bytes())
            os.replace(temporary, self.folder / name)
        except OSError as error:
            raise TransportError(f"cannot write to {self.folder}: {error.strerror}") from None

    def describe(self) -> str:
        return f"folder {self.folder}"


class SmtpTransport:
    """Sends through an SMTP server with aiosmtplib.

    ``smtp://`` upgrades with STARTTLS when the server offers it,
    ``smtp+starttls://`` requires STARTTLS, ``smtps://`` connects with TLS.
    """

    def __init__(self, url: str, timeout: float = DEFAULT_SMTP_TIMEOUT_SECONDS) -> None:
        parts = urlsplit(url)
        self.timeout = timeout
        self.host = parts.hostname or ""
        self.implicit_tls = parts.scheme == "smtps"
        self.require_starttls = parts.scheme == "smtp+starttls"
        self.port = parts.port or (465 if self.implicit_tls else 587)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    async def send(self, message: EmailMessage) -> None:
        try:
            await aiosmtplib.send(
                message,
                hostname=self.host,
                port=self.port,
                username=self.username,
                password=self.password,
                use_tls=self.implicit_tls,
                start_tls=True if self.require_starttls else None,
                timeout=self.timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as error:
            raise TransportError(f"{type(error).__name__}: {error}") from None

    def describe(self) -> str:
        tls = "plain"
        if self.implicit_tls:
            tls = "TLS"
        elif self.require_starttls:
            tls = "STARTTLS"
        return f"SMTP {self.host}:{self.port} ({tls})"


def transport_from_url(url: str, timeout: float = DEFAULT_SMTP_TIMEOUT_SECONDS) -> Transport:
    """Choose the transport for a ``SAFERESET_MAIL_URL`` value (already validated)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return FolderTransport(Path(unquote(parts.path)))
    return SmtpTransport(url, timeout)
