"""Logging: structlog, one JSON object per line (orjson) for machines, or a console format for people.

Every line has `timestamp` (UTC ISO 8601), `level`, `logger` and `event`; request lines carry `rid` (the id
sent upstream as x-tokenpools-request-id), passed explicitly or bound with structlog.contextvars.

Never logged: API keys and prompt text. Our own calls never pass them; `_redact` is the second line of
defence for a future call that passes headers or a body by mistake, and tracebacks are rendered as plain text
(no local variables, which could hold a request's headers or body).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import orjson
import structlog

# Event keys whose values may hold a key or prompt text: replaced, whatever logged them.
_SECRET_KEYS = frozenset({
    "authorization", "api_key", "apikey", "key", "token", "headers", "body", "prompt", "messages", "input",
    "content", "text",
})  # fmt: skip
REDACTED = "[redacted]"


_BEARER = re.compile(r"(?i)\bbearer\s+\S+")


def _redact(logger: Any, method: str, event: dict) -> dict:
    for k in _SECRET_KEYS.intersection(event):
        event[k] = REDACTED
    for k, v in event.items():  # a credential quoted inside some other text (an error message, say)
        if type(v) is str and "earer" in v:
            event[k] = _BEARER.sub("Bearer " + REDACTED, v)
    return event


class _Named:
    """structlog's Print/Bytes loggers have no name: keep the one given to get_logger() for `logger`."""

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self.name = name
        self.msg = inner.msg

    def __getattr__(self, method: str) -> Any:  # info, debug, error, ...: all print the rendered line
        return self._inner.msg


class _Factory:
    def __init__(self, make) -> None:
        self._make = make

    def __call__(self, *args: Any) -> _Named:
        return _Named(self._make(), str(args[0]) if args else "tokenpools")


# Whether per-decision debug lines are wanted: the request path checks this flag (tens of ns) rather than call
# a filtered log.debug (0.5 µs on a cached logger, ~6 µs through an uncached module-level proxy).
DECISIONS = False


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None, cache: bool = True) -> None:
    """Configure structlog for the process (`tokenpools serve` calls it once at start).

    cache: loggers keep this configuration once used (fast); tests that reconfigure pass False.
    """
    global DECISIONS
    DECISIONS = level.lower() == "debug"
    stream = stream or sys.stderr
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            factory = _Factory(lambda: structlog.BytesLogger(buffer))
        else:  # a text-only stream (tests' StringIO): decode each line
            factory = _Factory(lambda: _TextFromBytes(stream))
    elif fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback))
        factory = _Factory(lambda: structlog.PrintLogger(stream))
    else:
        raise ValueError(f"unknown log format {fmt!r} (json or console)")
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )


class _TextFromBytes:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: bytes) -> None:
        self._stream.write(message.decode() + "\n")
        self._stream.flush()
