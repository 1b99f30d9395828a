"""The daemon's log: one event per line on stderr, in the form its reader wants.

    text     a person at a terminal: `2026-12-01T23:10:00.123Z INFO run.finished ref=… outcome=completed`
    json     a log pipeline: one JSON object per line (`ts`, `level`, `logger`, `event`, fields)
    journal  journald: the level as a `<N>` syslog prefix it turns into the entry's
             priority, no timestamp (the journal keeps its own)
    auto     journal when stderr is connected to the journal ($JOURNAL_STREAM names it,
             see systemd.exec(5)), else text

An event is a name and fields (`genvisor.logevent.event(log, "run.finished", ref=…)`);
a plain message logs as an event named by its text. Level: $GENVISOR_LOG_LEVEL (INFO).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Literal

import msgspec

from genvisor.logevent import FIELDS_ATTRIBUTE

LogFormat = Literal["auto", "text", "json", "journal"]
LOG_LEVEL_ENV = "GENVISOR_LOG_LEVEL"

def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, FIELDS_ATTRIBUTE, None) or {}


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return msgspec.json.encode(text).decode() if (not text or any(c in text for c in ' "=\n')) else text


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _line(record: logging.LogRecord) -> str:
    parts = [record.getMessage()]
    parts += [f"{key}={_text_value(value)}" for key, value in _fields(record).items()]
    if record.exc_info:
        parts.append("traceback=" + _text_value(logging.Formatter().formatException(record.exc_info)))
    return " ".join(parts)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{_timestamp(record)} {record.levelname} {record.name} {_line(record)}"


class JournalFormatter(logging.Formatter):
    # syslog priorities (sd-daemon(3)): journald reads a leading <N> as the entry's.
    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self._PRIORITY.get(record.levelno, 6)
        # One entry per line: a traceback's newlines would split it into several.
        return f"<{priority}>{record.name} {_line(record)}".replace("\n", " ")


class JsonFormatter(logging.Formatter):
    _encode = msgspec.json.Encoder().encode

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name,
                                "event": record.getMessage()}
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["traceback"] = logging.Formatter().formatException(record.exc_info)
        try:
            return self._encode(line).decode()
        except (TypeError, ValueError):  # a field msgspec cannot encode: say what it was
            return self._encode({**line, **{k: repr(v) for k, v in _fields(record).items()}}).decode()


def stderr_is_journal() -> bool:
    """$JOURNAL_STREAM is `DEV:INODE` of the stream systemd connected to the journal;
    it is ours only if stderr is still that stream (not redirected since)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def configure(log_format: LogFormat) -> None:
    chosen = ("journal" if stderr_is_journal() else "text") if log_format == "auto" else log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter({"text": TextFormatter, "json": JsonFormatter, "journal": JournalFormatter}[chosen]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
