"""Logging set-up: one line per request and per state change, text or JSON.

Every record carries the request id of the HTTP request it belongs to (from a
context variable) and the ids passed as ``extra={"ids": {...}}``. A filter
replaces anything shaped like a token with a placeholder, so a token that
reaches a message or an argument by mistake still never reaches a log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from safereset.crypto import TOKEN_PATTERN

request_id: ContextVar[str | None] = ContextVar("safereset_request_id", default=None)

REDACTED = "[token redacted]"
# Distinct warnings RepeatLimit tracks before it drops the windows that ended.
MAX_REPEAT_KEYS = 1000


def event(logger: logging.Logger, message: str, **ids: object) -> None:
    """Log a state change at INFO with the ids involved."""
    logger.info(message, extra={"ids": ids})


# Control characters, escaped so that a request path with an encoded newline
# cannot forge a log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(text: str) -> str:
    text = TOKEN_PATTERN.sub(REDACTED, text)
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class _Scrub(logging.Filter):
    """Redacts token-shaped text, escapes control characters, attaches the request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _clean(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        ids = getattr(record, "ids", None)
        if isinstance(ids, dict):
            record.ids = {
                key: _clean(value) if isinstance(value, str) else value
                for key, value in ids.items()
            }
        record.request_id = request_id.get()
        return True


class RepeatLimit(logging.Filter):
    """Passes at most ``limit`` equal warnings per ``interval`` seconds and counts the rest.

    A flood of refused requests (rate limits, busy hashing) would otherwise
    write one warning each, and the log would become the flood's cost. Two
    warnings are equal when logger, message template and arguments are; the
    request ids may differ. The first warning after a window passes carries
    how many were dropped in it as ``suppressed``. Other levels always pass.
    """

    def __init__(
        self,
        limit: int = 10,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.limit = limit
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        # key -> [window start, warnings passed, warnings dropped]
        self._windows: dict[tuple[object, ...], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, str(record.msg), repr(record.args))
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval:
                if len(self._windows) >= MAX_REPEAT_KEYS:
                    self._forget_before(now - self.interval)
                if len(self._windows) >= MAX_REPEAT_KEYS:
                    self._windows.clear()
                self._windows[key] = [now, 1, 0]
                if window is not None and window[2]:
                    record.ids = {**(getattr(record, "ids", None) or {}), "suppressed": window[2]}
                return True
            if window[1] < self.limit:
                window[1] += 1
                return True
            window[2] += 1
            return False

    def _forget_before(self, moment: float) -> None:
        # The dropped counts of forgotten windows are lost; the cap bounds memory.
        for key in [key for key, window in self._windows.items() if window[0] < moment]:
            del self._windows[key]


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields: dict[str, Any] = dict(getattr(record, "ids", None) or {})
        current_request = getattr(record, "request_id", None)
        if current_request:
            fields = {"request_id": current_request, **fields}
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        # Tracebacks are formatted here, after the filter ran, so scrub again.
        return TOKEN_PATTERN.sub(REDACTED, line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        current_request = getattr(record, "request_id", None)
        if current_request:
            entry["request_id"] = current_request
        entry.update(getattr(record, "ids", None) or {})
        if record.exc_info:
            entry["exception"] = TOKEN_PATTERN.sub(REDACTED, self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure(log_format: str = "text", level: str = "INFO") -> None:
    """Send safereset's and Uvicorn's logs to standard error in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatLimit())
    handler.addFilter(_Scrub())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("safereset", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # safereset writes its own request line without the query string.
    logging.getLogger("uvicorn.access").disabled = True
