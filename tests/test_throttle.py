"""The GCRA rate limiter: the pure reference ``step`` and the SQL ``check`` that must match it.

``check`` runs against the ``runtime`` fixture's database, so every SQL test
here runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from safereset import throttle
from safereset.runtime import Runtime
from safereset.store import models
from safereset.throttle import Rate, RateLimited
from tests.conftest import FakeClock

# Up to 10 events per period of up to an hour, with events spread over two
# hours, give full, empty and partly refilled buckets.
RATES = st.builds(Rate, st.integers(1, 10), st.integers(1, 3600))
EXAMPLES = 25


def run_check(runtime: Runtime, scope: str, key: str, rate: Rate, now: datetime) -> int | None:
    """Run ``throttle.check`` in its own transaction; return None or the Retry-After seconds."""
    service = runtime.service
    try:
        with DbSession(service.engine) as db, db.begin():
            throttle.check(db, service.keyring, scope, key, rate, now)
    except RateLimited as limited:
        return limited.retry_after
    return None


def stored_tat(runtime: Runtime, scope: str) -> int:
    with DbSession(runtime.service.engine) as db:
        [tat] = db.scalars(select(models.Throttle.tat).where(models.Throttle.scope == scope))
        return tat


# Parsing rates


@pytest.mark.parametrize(
    ("text", "limit", "seconds"),
    [
        ("10/15m", 10, 900),
        ("5/h", 5, 3600),
        ("3/1m", 3, 60),
        (" 2 / 30 s ", 2, 30),
        ("10/1d", 10, 86400),
    ],
)
def test_rate_parse(text: str, limit: int, seconds: int) -> None:
    assert Rate.parse(text) == Rate(limit, seconds)


@pytest.mark.parametrize("text", ["", "10", "10/", "10/5", "0/1m", "-1/1m", "1/0m", "1/1w"])
def test_rate_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        Rate.parse(text)


# The reference


# Times in these tests are microseconds, like the limiter's.
SECOND = 1_000_000


def test_step_allows_burst() -> None:
    rate = Rate(3, 60)
    tat: int | None = None
    for _ in range(3):
        allowed, tat = throttle.step(tat, 0, rate)
        assert allowed

    allowed, after = throttle.step(tat, 0, rate)

    assert not allowed
    assert after == tat  # a rejected event does not move the bucket


def test_step_refills_one_interval() -> None:
    rate = Rate(3, 60)
    tat = 60 * SECOND  # three events at time 0

    assert throttle.step(tat, 20 * SECOND - 1, rate)[0] is False
    assert throttle.step(tat, 20 * SECOND, rate) == (True, 80 * SECOND)


def test_step_full_after_period() -> None:
    rate = Rate(3, 60)

    assert throttle.step(60 * SECOND, 60 * SECOND, rate) == (True, 80 * SECOND)
    assert throttle.step(60 * SECOND, 500 * SECOND, rate) == (True, 520 * SECOND)


# The SQL against the reference


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rate=RATES,
    offsets=st.lists(st.integers(0, 2 * 3600 * 10**6), min_size=1, max_size=12),
)
def test_check_matches_step(
    runtime: Runtime, clock: FakeClock, rate: Rate, offsets: list[int]
) -> None:
    # Each example gets its own scope, so buckets of earlier examples do not count.
    scope = f"p{uuid.uuid4().hex[:20]}"
    tat: int | None = None
    for offset in offsets:
        now = clock.current + timedelta(microseconds=offset)
        allowed, tat = throttle.step(tat, throttle.to_microseconds(now), rate)

        retry_after = run_check(runtime, scope, "client", rate, now)

        assert (retry_after is None) == allowed, f"at {offset} us"
        assert stored_tat(runtime, scope) == tat, f"at {offset} us"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rate=RATES, offset=st.integers(0, 3600 * 10**6))
def test_retry_after_suffices(runtime: Runtime, clock: FakeClock, rate: Rate, offset: int) -> None:
    scope = f"r{uuid.uuid4().hex[:20]}"
    start = clock.current + timedelta(microseconds=offset)
    retry_after = None
    for _ in range(rate.limit + 1):
        retry_after = run_check(runtime, scope, "client", rate, start)
        if retry_after is not None:
            break

    assert retry_after is not None
    assert retry_after >= 1
    assert retry_after <= math.ceil(rate.interval / SECOND)
    later = start + timedelta(seconds=retry_after)
    assert run_check(runtime, scope, "client", rate, later) is None


# The last two have intervals (514.28... s and 4.28... s) that are not whole
# microseconds; a float sum of them once turned away the last event of a burst.
BURSTS = ["3/1m", "10/15m", "5/1h", "10/1d", "7/1h", "14/1m"]


@pytest.mark.parametrize("text", BURSTS)
def test_step_burst_is_limit(text: str, clock: FakeClock) -> None:
    rate = Rate.parse(text)
    now = throttle.to_microseconds(clock.current)
    tat: int | None = None
    allowed = 0
    for _ in range(rate.limit + 1):
        passed, tat = throttle.step(tat, now, rate)
        allowed += passed

    assert allowed == rate.limit, f"{text} let {allowed} events through at once"


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 100),
    period=st.integers(1, 86400),
    offset=st.integers(0, 365 * 86400 * 10**6),
)
def test_step_burst_property(limit: int, period: int, offset: int) -> None:
    rate = Rate(limit, period)
    now = throttle.to_microseconds(FakeClock().current + timedelta(microseconds=offset))
    tat: int | None = None
    allowed = 0
    for _ in range(limit + 1):
        passed, tat = throttle.step(tat, now, rate)
        allowed += passed

    assert allowed == limit


@pytest.mark.parametrize("text", BURSTS)
def test_check_burst_is_limit(runtime: Runtime, clock: FakeClock, text: str) -> None:
    rate = Rate.parse(text)
    results = [
        run_check(runtime, "burst", "client", rate, clock.current) for _ in range(rate.limit + 1)
    ]

    allowed = results.count(None)
    assert allowed == rate.limit, f"{text} let {allowed} events through at once"


def test_check_separates_keys(runtime: Runtime, clock: FakeClock) -> None:
    rate = Rate(1, 60)
    assert run_check(runtime, "scope_a", "one", rate, clock.current) is None

    assert run_check(runtime, "scope_a", "one", rate, clock.current) is not None
    assert run_check(runtime, "scope_a", "two", rate, clock.current) is None
    assert run_check(runtime, "scope_b", "one", rate, clock.current) is None


def test_check_stores_no_raw_key(runtime: Runtime, clock: FakeClock) -> None:
    key = "198.51.100.23"
    run_check(runtime, "recover_client", key, Rate(1, 60), clock.current)

    with DbSession(runtime.service.engine) as db:
        [row] = db.scalars(select(models.Throttle))
    assert key not in row.key
    assert len(row.key) == 64
