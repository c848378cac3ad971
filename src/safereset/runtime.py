"""Wiring: from settings to a ready service, outbox and worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from safereset.crypto import Keyring
from safereset.mail.outbox import Outbox
from safereset.mail.transports import transport_from_url
from safereset.mail.worker import Worker
from safereset.passwords import Hasher
from safereset.service import Service, utc_now
from safereset.settings import Settings
from safereset.store.db import PoolSettings, make_engine


@dataclass
class Runtime:
    settings: Settings
    service: Service
    outbox: Outbox

    def worker(self) -> Worker:
        return Worker(
            self.outbox,
            transport_from_url(self.settings.resolved_mail_url, self.settings.smtp_timeout_seconds),
            sender=self.settings.mail_from,
            public_url=self.settings.public_url,
            poll_seconds=self.settings.worker_poll_seconds,
            before_delivery=self.service.process_recovery_requests,
        )


def build(
    settings: Settings,
    *,
    hasher: Hasher | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> Runtime:
    """Create the engine, keyring and service that ``settings`` describe."""
    engine = make_engine(
        settings.resolved_database_url,
        PoolSettings(
            settings.db_pool_size, settings.db_max_overflow, settings.db_pool_timeout_seconds
        ),
    )
    keyring = Keyring(settings.load_secret_keys())
    service = Service(
        engine,
        keyring,
        public_url=settings.public_url,
        token_ttl=timedelta(seconds=settings.token_ttl_seconds),
        session_ttl=timedelta(seconds=settings.session_ttl_seconds),
        code_ttl=timedelta(seconds=settings.code_ttl_seconds),
        limits=settings.limits,
        hasher=hasher,
        hashing_slots=settings.max_concurrent_hashes or None,
        hashing_queue=settings.hash_queue_size,
        hashing_wait=settings.hash_wait_seconds,
        clock=clock,
    )
    lease = timedelta(seconds=settings.mail_lease_seconds)
    return Runtime(settings, service, Outbox(engine, keyring, clock, lease=lease))
