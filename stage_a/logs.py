"""STAGE_A_LOG_FORMAT=json: one JSON object per log line, for `stage-a` commands and workers alike.

Each object has time (UTC, ISO 8601), level, logger and message, and the structured fields a record
carries (passed as ``extra=``: run, worker, batch, images, failed, seconds, tokens), so a log shipper
needs no regular expression to chart a batch's images or seconds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone

FIELDS = ("run", "worker", "batch", "images", "failed", "seconds", "tokens", "task", "queue")
"""The ``extra=`` keys copied into the JSON object when a record has them."""


class JsonFormatter(logging.Formatter):
    """``context``: fields every line of this process carries unless the record sets them (a
    worker's name)."""

    def __init__(self, context: Callable[[], dict[str, object]] | None = None) -> None:
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in (self.context() if self.context else {}).items():
            out.setdefault(key, value)
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def wants_json(environ: dict[str, str] | None = None) -> bool:
    """Whether STAGE_A_LOG_FORMAT asks for JSON lines (read before Settings validate it, for logging
    set up at start)."""
    env = os.environ if environ is None else environ
    return env.get("STAGE_A_LOG_FORMAT", "").strip().lower() == "json"


def use_json(*handlers: logging.Handler, context: Callable[[], dict[str, object]] | None = None) -> None:
    """Give ``handlers`` (default: the root logger's) the JSON formatter."""
    for h in handlers or tuple(logging.getLogger().handlers):
        h.setFormatter(JsonFormatter(context))
