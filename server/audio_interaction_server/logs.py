"""How the process's log lines look: plain text for a terminal, or one JSON object a line for a log pipeline.

``configure_logging(level, log_format)`` sets up the root logger on stderr (``serve`` and ``run``);
``route_uvicorn_logs()`` then sends uvicorn's own loggers through it, so in ``json`` every line of the
process is JSON. A JSON line holds ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, plus
``session_id`` and ``replica_id`` when the record is about a session, and ``exception`` (the traceback)
when it has one.

Several processes writing one log (``serve --fronts N``: a supervisor, an engine process, N fronts) each name
themselves on every line (``configure_logging(..., process="f0")``): ``INFO [f0] uvicorn.access: ...`` in text, a
``process`` field in JSON. Their uvicorn lines then go through the same handler, in text too, so that a front's
access lines say which front served them.

Which session a record is about, without changing the calls that log it:

* ``bind_session(session_id)``, called where a connection's session id is minted, marks the current
  task and every task it starts (a context variable), so whatever the connection logs carries the id;
* a record logged elsewhere (the model worker's thread) that names a session id among its arguments
  (``log.error("session %s failed", session_id)``) carries that id.

The replica id is the text before the id's last ``_`` (api/runtime.py mints ``<replica id>_<32 hex>``).
A leaf: imports nothing of the package.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Which of several processes writes this log (``configure_logging``), or None for a server of one process.
_process: str | None = None
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")

# "<replica id>_<32 hex>": the replica id's characters as config.REPLICA_ID_PATTERN allows them.
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}_[0-9a-f]{32}")
_current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("log_session_id", default=None)


def bind_session(session_id: str) -> None:
    """The current task and the tasks it starts from now on log about ``session_id``."""
    _current_session.set(session_id)


def session_of(record: logging.LogRecord) -> str | None:
    """The session ``record`` is about: the task's bound session, else a session id among its arguments."""
    bound = _current_session.get()
    if bound is not None:
        return bound
    args = record.args if isinstance(record.args, tuple) else ()
    return next((arg for arg in args if isinstance(arg, str) and _SESSION_ID.fullmatch(arg)), None)


class SessionFields(logging.Filter):
    """Puts ``session_id`` and ``replica_id`` on every record (None when it is about no session)."""

    def filter(self, record: logging.LogRecord) -> bool:
        session_id = session_of(record)
        record.session_id = session_id
        record.replica_id = session_id.rpartition("_")[0] if session_id is not None else None
        return True


def text_format(process: str | None = None) -> str:
    """The text line's format, naming ``process`` (one of several writing one log) when there is one."""
    return TEXT_FORMAT if process is None else TEXT_FORMAT.replace(" ", f" [{process.replace('%', '%%')}] ", 1)


def process_name() -> str | None:
    """The process named on every line (``configure_logging``'s ``process``), or None."""
    return _process


class JsonFormatter(logging.Formatter):
    """One JSON object a line; the fields that do not apply are left out. ``process``: see ``configure_logging``."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process is not None:
            line["process"] = self.process
        for field in ("session_id", "replica_id"):
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_text:  # written already (by a filter, redacted; or by another handler's formatter)
            line["exception"] = record.exc_text
        elif record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is written, not the one there at set-up: a server run
    inside another program (tests run servers in-process, one after another, each test with its own captured
    stderr) would otherwise write to a stream closed since, and logging prints an error per record instead."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it: the property stands instead
        pass


def configure_logging(level: str, log_format: str, process: str | None = None) -> None:
    """The root logger writes ``level`` and above to stderr in ``log_format`` (``text`` or ``json``),
    replacing any earlier set-up; Python warnings become log records, so they are JSON lines too. ``process``:
    the name this process gives itself on every line, where several write one log (``supervisor``, ``engine``,
    ``f0``...)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: choose one of {', '.join(LOG_FORMATS)}")
    global _process
    _process = process
    handler = _StderrHandler()
    handler.addFilter(SessionFields())
    handler.setFormatter(JsonFormatter(process) if log_format == "json" else logging.Formatter(text_format(process)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # torch's INFO records are its own bookkeeping (FakeTensor cache statistics written as the interpreter exits,
    # after a command's last line): from warnings up, unless debugging.
    logging.getLogger("torch").setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    # Python warnings become records where a line must be JSON, or name its process (warnings.warn writes no name).
    logging.captureWarnings(log_format == "json" or process is not None)


def report_error(message: str, log_format: str, logger: str = "audio_interaction_server") -> None:
    """A command's last word, the error that stopped it: one ``error: ...`` line on stderr, or with JSON logs a JSON
    record like every other line, so a log pipeline that parses each line does not choke on the one that matters
    most. Written whether or not logging is set up yet (a bad configuration stops the server before it is)."""
    if log_format == "json":
        record = logging.LogRecord(logger, logging.ERROR, __file__, 0, message, None, None)
        SessionFields().filter(record)
        line = JsonFormatter(_process).format(record)  # the supervisor's last word names it as its other lines do
    else:
        line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)


def requested_log_format(flag: str | None) -> str:
    """The log format asked for, before any configuration is read: the flag, else ``AIS_LOG_FORMAT``, else text
    (not checked: the caller says what an unknown one means)."""
    return flag or os.environ.get("AIS_LOG_FORMAT") or "text"


def log_format_before_config(flag: str | None) -> str:
    """The log format for what is said before the configuration is read (or when it cannot be): the one asked for,
    or text for an unknown one (the configuration's own check names it)."""
    chosen = requested_log_format(flag)
    return chosen if chosen in LOG_FORMATS else "text"


# Requests a balancer, an orchestrator or a metrics scraper makes every few seconds (HAProxy's health check every
# 2 s per front per balancer): their access lines buried the session lines.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


class ProbeRequestFilter(logging.Filter):
    """Leaves out the access line of a successful probe request (``PROBE_PATHS``, status below 400), unless the log
    is at debug level; a failed one (``/ready`` answering 503: a replica stopped being ready) is written."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if self.debug or not isinstance(args, tuple) or len(args) != 5:  # uvicorn's access line: 5 arguments
            return True
        _client, _method, target, _version, status = args
        path = str(target).partition("?")[0]
        return not (path in PROBE_PATHS and isinstance(status, int) and status < 400)


def quiet_probe_requests(debug: bool) -> None:
    """Add ``ProbeRequestFilter`` to uvicorn's access logger, once (``log_probe_requests: false``)."""
    logger = logging.getLogger("uvicorn.access")
    for existing in [f for f in logger.filters if isinstance(f, ProbeRequestFilter)]:
        logger.removeFilter(existing)
    logger.addFilter(ProbeRequestFilter(debug))


def route_uvicorn_logs() -> None:
    """uvicorn gives its loggers handlers and formats of its own when its config is built; send them through
    the root's handler instead (call after that, for ``json``: uvicorn's lines would not be JSON)."""
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
