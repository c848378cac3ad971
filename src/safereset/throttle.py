"""Rate limits kept in the database, so every instance shares them.

Each limit is a generic cell rate algorithm (GCRA) bucket per (scope, key):
one row stores the bucket's theoretical arrival time (TAT), and one atomic
``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` both decides and records
each check, so two instances checking at once cannot both take the last slot.

A rate of N per period lets N requests through at once, then one every
period/N. Keys are stored only as keyed digests, so the table contains no client
address and no email address.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Table, case, literal
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session as DbSession

from safereset.crypto import Keyring
from safereset.store import models

log = logging.getLogger("safereset.throttle")

KEY_PURPOSE = "throttle"
MICROSECONDS = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*")


class RateLimited(Exception):
    """Too many requests in one scope; ``retry_after`` is in whole seconds."""

    def __init__(self, scope: str, retry_after: int, key_digest: str = "") -> None:
        super().__init__(f"rate limit of {scope} reached; retry after {retry_after} s")
        self.scope = scope
        self.retry_after = retry_after
        self.key_digest = key_digest


@dataclass(frozen=True)
class Rate:
    """``limit`` events per ``period_seconds``, all of them allowed at once."""

    limit: int
    period_seconds: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period_seconds <= 0:
            raise ValueError("a rate needs a limit of at least 1 and a positive period")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Parse ``"10/15m"``: 10 per 15 minutes (units s, m, h, d; ``"5/h"`` means 5/1h)."""
        match = _RATE.fullmatch(text)
        if match is None:
            raise ValueError(f"invalid rate {text!r}; expected N/PERIOD such as 10/15m or 5/1h")
        count, amount, unit = match.groups()
        return cls(int(count), int(amount or 1) * _UNITS[unit])

    @property
    def interval(self) -> int:
        """Microseconds between two events at the sustained rate (GCRA's emission interval).

        Whole microseconds, rounded down, so that sums of intervals are exact
        and a full burst always fits: ``limit * interval <= period``.
        """
        return int(self.period_seconds * MICROSECONDS) // self.limit

    @property
    def tolerance(self) -> int:
        """How many microseconds ahead of now the TAT may run and still let an event through."""
        return int(self.period_seconds * MICROSECONDS) - self.interval


@dataclass(frozen=True)
class Limits:
    """The limits the service applies, each per scope; defaults are argued in the README."""

    recovery_per_client: Rate = Rate(10, 15 * 60)
    recovery_per_address: Rate = Rate(5, 3600)
    completion_per_client: Rate = Rate(20, 15 * 60)
    login_per_account: Rate = Rate(10, 15 * 60)
    login_per_client: Rate = Rate(50, 15 * 60)
    mail_per_account: Rate = Rate(10, 86400)


def to_microseconds(moment: datetime) -> int:
    """Return microseconds since the Unix epoch, exactly (no float on the way)."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def step(tat: int | None, now: int, rate: Rate) -> tuple[bool, int]:
    """Return whether an event at ``now`` is allowed, and the bucket's new TAT.

    Times are microseconds since the epoch. This is the reference for the SQL
    in ``check``: both must agree on every input.
    """
    start = now if tat is None or tat < now else tat
    if start - now <= rate.tolerance:
        return True, start + rate.interval
    return False, start


def check(db: DbSession, keyring: Keyring, scope: str, key: str, rate: Rate, now: datetime) -> None:
    """Count one event against ``scope`` and ``key``; raise ``RateLimited`` when over."""
    digest = keyring.digest(KEY_PURPOSE, f"{scope}:{key}")
    moment = to_microseconds(now)
    table = cast(Table, models.Throttle.__table__)
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

    # In ON CONFLICT DO UPDATE, table.c.tat is the stored row's TAT. Both SET
    # expressions read the row as it was, so they agree on ``fits``.
    stored = table.c.tat
    start = case((stored > moment, stored), else_=literal(moment))
    fits = start - moment <= rate.tolerance
    statement = (
        insert(table)
        .values(scope=scope, key=digest, tat=moment + rate.interval, allowed=True)
        .on_conflict_do_update(
            index_elements=[table.c.scope, table.c.key],
            set_={
                "tat": case((fits, start + rate.interval), else_=stored),
                "allowed": case((fits, literal(True)), else_=literal(False)),
            },
        )
        .returning(table.c.tat, table.c.allowed)
    )
    tat, allowed = db.execute(statement).one()
    if not allowed:
        retry_after = max(1, math.ceil((tat - rate.tolerance - moment) / MICROSECONDS))
        log.warning(
            "rate limit reached", extra={"ids": {"scope": scope, "key_digest": digest[:16]}}
        )
        raise RateLimited(scope, retry_after, digest[:16])
