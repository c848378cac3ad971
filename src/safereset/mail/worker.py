"""The delivery worker: leases due messages, composes them and hands them to a transport."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from safereset.crypto import SealError
from safereset.mail.compose import compose
from safereset.mail.outbox import LeasedMail, Outbox
from safereset.mail.transports import Transport, TransportError

log = logging.getLogger("safereset.worker")


def worker_name() -> str:
    """Return an id for this worker that is unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Delivers outbox messages until stopped."""

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        *,
        sender: str,
        public_url: str,
        poll_seconds: float = 1.0,
        name: str | None = None,
        before_delivery: Callable[[], int] | None = None,
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.sender = sender
        self.public_url = public_url
        self.poll_seconds = poll_seconds
        self.name = name or worker_name()
        # Work that queues mail, run first in each round: resolving recovery requests.
        self.before_delivery = before_delivery
        # Stable per outbox message, so a redelivery carries the same Message-ID.
        self.message_id_domain = urlsplit(public_url).hostname or "safereset"

    async def run(self, stop: asyncio.Event) -> None:
        """Run rounds until ``stop`` is set, waiting ``poll_seconds`` after an idle round."""
        log.info(
            "worker started",
            extra={"ids": {"worker": self.name, "transport": self.transport.describe()}},
        )
        while not stop.is_set():
            worked = False
            try:
                resolved, _sent, leased = await self._deliver_round()
                worked = resolved > 0 or leased > 0
            except Exception:
                # A database outage must not end the worker; it tries again later.
                log.exception("delivery round failed", extra={"ids": {"worker": self.name}})
            if worked:
                # A round resolves a bounded number of requests, so a backlog
                # takes several rounds: start the next one at once.
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_seconds)
        log.info("worker stopped", extra={"ids": {"worker": self.name}})

    async def deliver_due(self) -> int:
        """Run one round: resolve requests, then deliver every message due now.

        Returns how many messages were sent.
        """
        return (await self._deliver_round())[1]

    async def _deliver_round(self) -> tuple[int, int, int]:
        """Return how many requests were resolved and messages sent and leased."""
        resolved = 0
        if self.before_delivery is not None:
            resolved = await asyncio.to_thread(self.before_delivery)
        sent = leased = 0
        while True:
            mail = await asyncio.to_thread(self.outbox.lease_next, self.name)
            if mail is None:
                return resolved, sent, leased
            leased += 1
            if await self._deliver(mail):
                sent += 1

    async def _deliver(self, mail: LeasedMail) -> bool:
        try:
            message = compose(
                mail.kind,
                sender=self.sender,
                recipient=mail.recipient,
                message_id=f"<{mail.message_id}@{self.message_id_domain}>",
                date=self.outbox.now(),
                values=self._values(mail),
            )
            await self.transport.send(message)
        except (TransportError, SealError, ValueError) as error:
            await asyncio.to_thread(self.outbox.failed, mail, str(error))
            log.warning(
                "delivery failed",
                extra={"ids": {"message_id": mail.message_id, "error": str(error)}},
            )
            return False
        return await asyncio.to_thread(self.outbox.delivered, mail)

    def _values(self, mail: LeasedMail) -> dict[str, object]:
        values = dict(mail.values)
        if mail.kind in ("recovery_link", "recovery_code") and mail.secret is None:
            raise ValueError(f"{mail.kind} mail has no sealed secret")
        if mail.kind == "recovery_link":
            # The link starts with the configured public URL, never a request's Host.
            values["link"] = f"{self.public_url}/recover?token={mail.secret}"
        elif mail.kind == "recovery_code":
            values["code"] = mail.secret
        return values
