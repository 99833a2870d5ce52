"""Structured logs: one JSON object per line, request ids, nothing secret or personal.

`configure_logging(json)` (called by `custody serve`; CUSTODY_LOG_FORMAT=json|text|auto) sends
every log record of the process to stderr through a queue: the thread that logs (the gRPC event
loop, a committer) only enqueues, a listener thread formats and writes.

A JSON line has `ts` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`, and when known
`request_id`, `platform`, `method`, `role`, `status`, `reason`, `duration_ms`, `exc`. Nothing else
of a record is written: a record's `extra` fields outside that list are dropped, never dumped.

Request ids: the call gate (`ledger/api/handlers.py`) starts a `Call` for every custody.v1 call
with the caller's `x-request-id` metadata if it is well formed (8..64 of [A-Za-z0-9._:-], no
long digit runs) or else a new random id (128 bits), keeps it in a context variable (so every
record logged while the call runs carries it, including in the worker pool) and returns it in
the trailing metadata `x-request-id`, on success and on error alike.

What is never logged: the ledger logs ids, positions, codes and counts, never instructions,
names, bank accounts, keys, salts or signatures. As a second line of defence, `scrub` masks in
every message and traceback what looks like key or signature material (PEM blocks, base64 or
hex runs of 43+ characters) and long digit runs (15+ digits: bank and card numbers), and cuts
messages at 4,000 characters.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import copy
import datetime as dt
import logging
import logging.handlers
import queue
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any, Final

import msgspec

REQUEST_ID_HEADER: Final = "x-request-id"
_REQUEST_ID_RE: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{7,63}\Z")
_LONG_DIGITS_RE: Final = re.compile(r"\d{12,}")
MESSAGE_MAX: Final = 4000
FORMATS: Final = ("auto", "json", "text")

# What `scrub` masks (second line of defence; the first is not logging such things at all).
_PEM_RE: Final = re.compile(r"-----BEGIN [A-Z ]+-----.*?(-----END [A-Z ]+-----|\Z)", re.S)
_BLOB_RE: Final = re.compile(r"[A-Za-z0-9+/_-]{43,}={0,2}")
_DIGITS_RE: Final = re.compile(r"\d{15,}")


def scrub(text: str) -> str:
    """Mask key, signature and account-number-like material; cut to MESSAGE_MAX characters."""
    if len(text) > MESSAGE_MAX:
        text = text[:MESSAGE_MAX] + "...[cut]"
    text = _PEM_RE.sub("[pem]", text)
    text = _BLOB_RE.sub("[redacted]", text)
    return _DIGITS_RE.sub("[digits]", text)


# -- the call a log record belongs to -------------------------------------------------------------


@dataclass(slots=True)
class Call:
    """One custody.v1 call, as its log records name it."""

    request_id: str
    method: str
    platform: str = ""
    role: str = ""
    reason: str = ""  # the ErrorInfo reason the call was answered with, if any
    started: float = 0.0  # time.perf_counter() when the gate took the call
    streaming: bool = False
    done: bool = False  # counted and logged (before an error status goes out, see abort)


_CALL: Final[contextvars.ContextVar[Call | None]] = contextvars.ContextVar(
    "custody_call", default=None
)


def current_call() -> Call | None:
    return _CALL.get()


def new_request_id() -> str:
    """128 random bits as four dash-separated groups of 8 hex digits: never a run of 12 digits,
    so a client may send it back (`request_id_from` accepts it) and `scrub` never masks it."""
    raw = secrets.token_hex(16)
    return "-".join(raw[i : i + 8] for i in range(0, 32, 8))


def request_id_from(metadata: Iterable[Any] | None) -> str:
    """The caller's `x-request-id` if present once and well formed, else a new one."""
    found: str | None = None
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == REQUEST_ID_HEADER:
            if found is not None:
                return new_request_id()  # given twice: trust neither
            found = value if isinstance(value, str) else ""
    if (
        found is None
        or _REQUEST_ID_RE.match(found) is None
        or _LONG_DIGITS_RE.search(found) is not None
    ):
        return new_request_id()
    return found


def begin_call(method: str, metadata: Iterable[Any] | None) -> tuple[Call, contextvars.Token[Any]]:
    call = Call(request_id_from(metadata), method)
    return call, _CALL.set(call)


def end_call(token: contextvars.Token[Any]) -> None:
    # an async generator closed from another context: nothing to undo there
    with contextlib.suppress(ValueError):
        _CALL.reset(token)


# -- records and formats --------------------------------------------------------------------------

# record attributes a JSON line may carry beyond ts/level/logger/message (set by `extra=` or by
# the call context); anything else on a record is never written
_FIELDS: Final = ("request_id", "platform", "method", "role", "status", "reason", "duration_ms")
_ENCODE: Final = msgspec.json.Encoder().encode


class CallContextFilter(logging.Filter):
    """Copies the current call (request id, method, platform, role) onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = _CALL.get()
        if call is not None:
            if getattr(record, "request_id", None) is None:
                record.request_id = call.request_id
            if getattr(record, "method", None) is None:
                record.method = call.method
            if call.platform and getattr(record, "platform", None) is None:
                record.platform = call.platform
            if call.role and getattr(record, "role", None) is None:
                record.role = call.role
            if call.reason and getattr(record, "reason", None) is None:
                record.reason = call.reason
        return True


def _ts(created: float) -> str:
    moment = dt.datetime.fromtimestamp(created, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, one line (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "":
                line[name] = value if isinstance(value, int | float) else scrub(str(value))
        exc = getattr(record, "exc_text", None)
        if record.exc_info and not exc:
            exc = self.formatException(record.exc_info)
        if exc:
            line["exc"] = scrub(exc)
        return _ENCODE(line).decode()


class TextFormatter(logging.Formatter):
    """`<ts> <LEVEL> <logger> [<request id>] <message>` for a terminal, scrubbed like JSON."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        parts = [_ts(record.created), record.levelname, record.name]
        if rid:
            parts.append(f"[{rid}]")
        parts.append(scrub(record.getMessage()))
        for name in ("method", "status", "reason", "duration_ms"):
            value = getattr(record, name, None)
            if value is not None and value != "":
                parts.append(f"{name}={scrub(str(value))}")
        text = " ".join(parts)
        exc = getattr(record, "exc_text", None)
        if record.exc_info and not exc:
            exc = self.formatException(record.exc_info)
        if exc:
            text += "\n" + scrub(exc)
        return text


class _QueueHandler(logging.handlers.QueueHandler):
    """Enqueue a copy with the message rendered and the traceback as text (exc_text), so the
    listener thread formats it as JSON with `exc` apart from `message`."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        message = record.getMessage()
        exc_text = record.exc_text
        if record.exc_info and not exc_text:
            exc_text = logging.Formatter().formatException(record.exc_info)
        record = copy.copy(record)
        record.msg = message
        record.args = None
        record.exc_info = None
        record.exc_text = exc_text
        record.stack_info = None
        return record


_installed: tuple[logging.Handler, logging.handlers.QueueListener] | None = None


def json_wanted(log_format: str, stream: IO[str] | None = None) -> bool:
    """CUSTODY_LOG_FORMAT: json, text, or auto (text on a terminal, else JSON)."""
    if log_format == "json":
        return True
    if log_format == "text":
        return False
    out = sys.stderr if stream is None else stream
    try:
        return not out.isatty()
    except (AttributeError, ValueError):
        return True


def configure_logging(
    json: bool, level: int = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every record of the process to `stream` (stderr) as JSON lines or text.

    Replaces what an earlier call installed (and nothing else the root logger has). Returns the
    handler attached to the root logger (a queue handler; the writing happens on a listener
    thread, stopped and flushed at exit or by the next call)."""
    global _installed
    root = logging.getLogger()
    unconfigure_logging()
    target = logging.StreamHandler(sys.stderr if stream is None else stream)
    target.setFormatter(JsonFormatter() if json else TextFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _QueueHandler(records)
    handler.addFilter(CallContextFilter())
    listener = logging.handlers.QueueListener(records, target, respect_handler_level=False)
    listener.start()
    root.addHandler(handler)
    root.setLevel(level)
    _installed = (handler, listener)
    return handler


def unconfigure_logging() -> None:
    """Remove what `configure_logging` installed, writing out what is queued."""
    global _installed
    if _installed is None:
        return
    handler, listener = _installed
    _installed = None
    logging.getLogger().removeHandler(handler)
    listener.stop()


atexit.register(unconfigure_logging)
