"""Logging of a process, configured once by its entry point (the CLI's main, a Ray actor's constructor) with
:func:`configure`: plain text for people, or one JSON object a line for machines (``--log-format json``, env
``LOOKALIKE_LOG_FORMAT``). Either way a record logged while a traced call runs carries the call's trace and span
ids (lookalike.tracing), so a failed request's log line leads to its trace.

Other modules only log, through ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os

import grpc

from lookalike import tracing

FORMATS = ("text", "json")
ENV_FORMAT = "LOOKALIKE_LOG_FORMAT"
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Statuses that say the server failed (HTTP's 5xx), not the request: servers log each (lookalike.net).
SERVER_ERRORS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS,
                           grpc.StatusCode.UNIMPLEMENTED})


class _TraceIds(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` to each record ("" outside a traced call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = tracing.current_ids()
        record.trace_id, record.span_id = ids or ("", "")
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, and ``trace_id=...`` at the end inside a traced call."""

    def __init__(self):
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        if not trace_id:
            return text
        first, nl, rest = text.partition("\n")  # before a traceback, on the message's line
        return f"{first} trace_id={trace_id}{nl}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``;
    ``trace_id`` and ``span_id`` inside a traced call; ``exception`` (the traceback's text) when one is logged."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if getattr(record, "trace_id", ""):
            out["trace_id"], out["span_id"] = record.trace_id, record.span_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def log_format(given: str | None = None, environ=None) -> str:
    """The format asked for: ``given`` (a flag), else ``LOOKALIKE_LOG_FORMAT``, else "text".

    Raises:
        ValueError: not one of :data:`FORMATS`.
    """
    env = os.environ if environ is None else environ
    fmt = (given or env.get(ENV_FORMAT) or "text").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"the log format must be one of {', '.join(FORMATS)}, not {fmt!r} (--log-format or "
                         f"{ENV_FORMAT})")
    return fmt


def configure(level: int | str = logging.INFO, fmt: str = "text", stream=None) -> logging.Handler | None:
    """Sends the process's log records at ``level`` and above to ``stream`` (default stderr) in ``fmt`` ("text" or
    "json"). A second call replaces what the first installed. Returns the handler installed, or None: in text,
    a root logger that has handlers of someone else's (an embedding program, a test runner) is left as it is, as
    logging.basicConfig does; JSON is added beside them (it was asked for)."""
    if fmt not in FORMATS:
        raise ValueError(f"the log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "lookalike", False)]:
        root.removeHandler(old)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked: noise in any log
    if root.handlers and fmt == "text":
        return None
    handler = logging.StreamHandler(stream)
    handler.lookalike = True
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_TraceIds())
    root.addHandler(handler)
    root.setLevel(level)
    if fmt == "json":
        # Ray logs through a handler of its own (its logger does not propagate), whose format ray.init sets again:
        # its lines go through this handler instead, in JSON too
        ray_logger = logging.getLogger("ray")
        ray_logger.handlers.clear()
        ray_logger.propagate = True
    return handler


def log_failed(logger: logging.Logger, method: str, code: grpc.StatusCode, message) -> None:
    """Logs a call that ends with ``code`` when that is a failure of the server (:data:`SERVER_ERRORS`), at WARNING:
    ``<method> failed: <STATUS>: <message>`` (with the call's trace id, by the handler's filter)."""
    if code in SERVER_ERRORS:
        logger.warning("%s failed: %s: %s", method, code.name, message)
