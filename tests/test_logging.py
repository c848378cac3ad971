"""Logging: request lines and state changes with their ids, in text and JSON format."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from safereset import logs
from safereset.runtime import Runtime

LOGGER_NAMES = ("safereset", "uvicorn", "uvicorn.error", "uvicorn.access")
FORMATS = ("text", "json")
TOKEN = "srt_" + "B" * 43

TEXT_LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<level>[A-Z]+) (?P<logger>[\w.]+): "
    r"(?P<message>.*?)(?P<fields>(?: \w+=\S*)*)"
)
GENERATED_REQUEST_ID = re.compile(r"[0-9a-f]{32}")

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configure_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """Yield a function that runs logs.configure with standard error captured.

    Afterwards the loggers that configure changes get their handlers, level,
    propagation and disabled flag back, so later tests see the old set-up.
    """
    saved = {}
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate, logger.disabled)

    def configure(log_format: str, level: str = "INFO") -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        logs.configure(log_format, level)
        return stream

    yield configure

    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def parse_records(output: str, log_format: str) -> list[dict[str, str]]:
    """Split the log output into one dict per line, every value as a string."""
    records = []
    for line in output.splitlines():
        if log_format == "json":
            entry = json.loads(line)
            records.append({key: str(value) for key, value in entry.items()})
            continue
        match = TEXT_LINE.fullmatch(line)
        assert match is not None, f"not a text log line: {line!r}"
        record = {key: match.group(key) for key in ("time", "level", "logger", "message")}
        record.update(re.findall(r" (\w+)=(\S*)", match.group("fields")))
        records.append(record)
    return records


def find(records: list[dict[str, str]], message_start: str) -> dict[str, str]:
    """Return the one record whose message starts with ``message_start``."""
    found = [record for record in records if record["message"].startswith(message_start)]
    assert len(found) == 1, f"expected one {message_start!r} line, got {found}"
    return found[0]


def request_recovery(
    client: TestClient, email: str = "alice@example.com", request_id: str | None = None
) -> str:
    """Post a recovery request and return the request id the response carries."""
    headers = {"X-Request-ID": request_id} if request_id is not None else {}
    response = client.post("/api/recovery", json={"email": email}, headers=headers)
    assert response.status_code == 202
    return response.headers["x-request-id"]


# Request lines and state changes


@pytest.mark.parametrize("log_format", FORMATS)
def test_request_line(client: TestClient, configure_logs: Configure, log_format: str) -> None:
    stream = configure_logs(log_format)

    request_id = request_recovery(client)

    record = find(parse_records(stream.getvalue(), log_format), "POST /api/recovery 202")
    assert record["logger"] == "safereset.http"
    assert record["level"] == "INFO"
    assert record["request_id"] == request_id


@pytest.mark.parametrize("log_format", FORMATS)
def test_state_changes_carry_ids(
    client: TestClient, runtime: Runtime, configure_logs: Configure, log_format: str
) -> None:
    user_id = runtime.service.add_user("alice@example.com")
    stream = configure_logs(log_format)

    request_id = request_recovery(client)
    runtime.service.process_recovery_requests()

    records = parse_records(stream.getvalue(), log_format)
    requested = find(records, "recovery requested")
    assert requested["request_id"] == request_id
    assert "user_id" not in requested
    ticket = find(records, "ticket issued")
    assert ticket["request_id"] == request_id
    assert ticket["user_id"] == str(user_id)
    assert GENERATED_REQUEST_ID.fullmatch(ticket["ticket_id"])
    mail = find(records, "mail queued")
    assert mail["request_id"] == request_id
    assert mail["user_id"] == str(user_id)
    assert GENERATED_REQUEST_ID.fullmatch(mail["message_id"])
    assert mail["kind"] == "recovery_link"


@pytest.mark.parametrize("log_format", FORMATS)
def test_event_outside_request(
    runtime: Runtime, configure_logs: Configure, log_format: str
) -> None:
    stream = configure_logs(log_format)

    user_id = runtime.service.add_user("alice@example.com")

    record = find(parse_records(stream.getvalue(), log_format), "user added")
    assert record["user_id"] == str(user_id)
    assert "request_id" not in record


@pytest.mark.parametrize("log_format", FORMATS)
def test_request_line_without_query(
    client: TestClient, configure_logs: Configure, log_format: str
) -> None:
    stream = configure_logs(log_format)

    response = client.get(f"/recover?token={TOKEN}&next=secret-value", follow_redirects=False)

    output = stream.getvalue()
    find(parse_records(output, log_format), f"GET /recover {response.status_code}")
    assert "secret-value" not in output
    assert "token" not in output


@pytest.mark.parametrize("log_format", FORMATS)
def test_newline_in_path_one_line(
    client: TestClient, configure_logs: Configure, log_format: str
) -> None:
    stream = configure_logs(log_format)

    client.get("/missing%0A2026-01-15 12:00:00,000 INFO safereset.service: forged line")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines


@pytest.mark.parametrize("log_format", FORMATS)
def test_token_redacted(configure_logs: Configure, log_format: str) -> None:
    stream = configure_logs(log_format)
    logger = logging.getLogger("safereset.test")

    logger.info("link sent: /recover?token=%s", TOKEN, extra={"ids": {"token": TOKEN}})

    output = stream.getvalue()
    assert TOKEN not in output
    assert logs.REDACTED in output


# X-Request-ID


@pytest.mark.parametrize("incoming", ["abc-123", "req.2026_01-15", "R" * 64])
@pytest.mark.parametrize("log_format", FORMATS)
def test_request_id_reused(
    client: TestClient, configure_logs: Configure, log_format: str, incoming: str
) -> None:
    stream = configure_logs(log_format)

    echoed = request_recovery(client, request_id=incoming)

    assert echoed == incoming
    record = find(parse_records(stream.getvalue(), log_format), "POST /api/recovery 202")
    assert record["request_id"] == incoming


@pytest.mark.parametrize(
    "incoming",
    [
        "R" * 65,  # too long
        "two words",
        "a/b",
        "id;drop",
        "",
    ],
)
@pytest.mark.parametrize("log_format", FORMATS)
def test_request_id_replaced(
    client: TestClient, configure_logs: Configure, log_format: str, incoming: str
) -> None:
    stream = configure_logs(log_format)

    echoed = request_recovery(client, request_id=incoming)

    assert echoed != incoming
    assert GENERATED_REQUEST_ID.fullmatch(echoed)
    record = find(parse_records(stream.getvalue(), log_format), "POST /api/recovery 202")
    assert record["request_id"] == echoed


def test_request_id_generated(client: TestClient, configure_logs: Configure) -> None:
    configure_logs("text")

    first = request_recovery(client)
    second = request_recovery(client)

    assert GENERATED_REQUEST_ID.fullmatch(first)
    assert second != first


# Formats and handlers


def test_json_line_fields(client: TestClient, runtime: Runtime, configure_logs: Configure) -> None:
    runtime.service.add_user("alice@example.com")
    stream = configure_logs("json")

    request_recovery(client)

    runtime.service.process_recovery_requests()

    lines = stream.getvalue().splitlines()
    assert len(lines) >= 4  # recovery requested, the request line, ticket issued, mail queued
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message", "request_id"} <= entry.keys()
        assert datetime.fromisoformat(entry["time"]).utcoffset() is not None


def test_json_ids_keep_types(runtime: Runtime, configure_logs: Configure) -> None:
    stream = configure_logs("json")

    user_id = runtime.service.add_user("alice@example.com")

    entry = json.loads(stream.getvalue())
    assert entry["user_id"] == user_id


def test_json_exception(configure_logs: Configure) -> None:
    stream = configure_logs("json")

    try:
        raise RuntimeError(f"failed with {TOKEN}")
    except RuntimeError:
        logging.getLogger("safereset.test").exception("delivery round failed")

    entry = json.loads(stream.getvalue())
    assert "RuntimeError" in entry["exception"]
    assert TOKEN not in entry["exception"]


@pytest.mark.parametrize("log_format", FORMATS)
def test_uvicorn_logs_same_format(configure_logs: Configure, log_format: str) -> None:
    stream = configure_logs(log_format)

    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("uvicorn.access").info("GET /recover?token=x 200")

    [record] = parse_records(stream.getvalue(), log_format)
    assert record["logger"] == "uvicorn.error"
    assert record["message"] == "Started server process"


def test_level_filters(configure_logs: Configure) -> None:
    stream = configure_logs("text", "WARNING")
    logger = logging.getLogger("safereset.test")

    logger.info("routine")
    logger.warning("delivery failed")

    [record] = parse_records(stream.getvalue(), "text")
    assert record["message"] == "delivery failed"
    assert record["level"] == "WARNING"


# Repeated warnings


class StepClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def warning_record(message: str = "request failed: %s %s", *args: object) -> logging.LogRecord:
    arguments = args or (503, "HashingBusy")
    return logging.LogRecord(
        "safereset.http", logging.WARNING, __file__, 1, message, arguments, None
    )


def test_repeat_limit_drops_excess() -> None:
    clock = StepClock()
    limit = logs.RepeatLimit(limit=3, interval=1.0, clock=clock)

    passed = [limit.filter(warning_record()) for _ in range(10)]

    assert passed == [True] * 3 + [False] * 7


def test_repeat_limit_reports_suppressed() -> None:
    clock = StepClock()
    limit = logs.RepeatLimit(limit=3, interval=1.0, clock=clock)
    for _ in range(10):
        limit.filter(warning_record())

    clock.now += 1.0
    later = warning_record()

    assert limit.filter(later)
    assert later.ids == {"suppressed": 7}
    assert limit.filter(warning_record())


def test_repeat_limit_keys_by_arguments() -> None:
    clock = StepClock()
    limit = logs.RepeatLimit(limit=1, interval=1.0, clock=clock)

    assert limit.filter(warning_record("request failed: %s %s", 503, "HashingBusy"))
    assert limit.filter(warning_record("request failed: %s %s", 429, "RateLimited"))
    assert not limit.filter(warning_record("request failed: %s %s", 503, "HashingBusy"))


@pytest.mark.parametrize("level", [logging.INFO, logging.ERROR, logging.CRITICAL])
def test_repeat_limit_passes_other_levels(level: int) -> None:
    limit = logs.RepeatLimit(limit=1, interval=1.0, clock=StepClock())

    records = [
        logging.LogRecord("safereset.http", level, __file__, 1, "same line", None, None)
        for _ in range(5)
    ]

    assert all(limit.filter(record) for record in records)


def test_repeat_limit_bounds_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "MAX_REPEAT_KEYS", 50)
    limit = logs.RepeatLimit(limit=1, interval=1.0, clock=StepClock())

    for index in range(500):
        assert limit.filter(warning_record("failed for %s", index))

    assert len(limit._windows) <= 50


def test_flood_of_warnings_limited(configure_logs: Configure) -> None:
    stream = configure_logs("text")
    logger = logging.getLogger("safereset.http")

    for _ in range(200):
        logger.warning("request failed: %s %s", 503, "HashingBusy")

    records = parse_records(stream.getvalue(), "text")
    # Ten per second; the loop may straddle the start of a second window.
    assert 1 <= len(records) <= 20
    assert all(record["message"] == "request failed: 503 HashingBusy" for record in records)
