"""Structured logging: every job log line carries the study UID and the job id.

Use :func:`job_logger` to get an adapter bound to a job; :func:`setup_logging`
installs a formatter that writes one JSON object per line (``--log-format
json``) or a readable ``key=value`` line, both with ``study_uid`` and
``job_id`` fields when the record has them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

__all__ = [
    "LOG_FORMAT_ENV",
    "JobLogAdapter",
    "StructuredFormatter",
    "job_logger",
    "setup_logging",
]

_CONTEXT_FIELDS = ("study_uid", "job_id")


class JobLogAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds ``study_uid`` and ``job_id`` to every record."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def job_logger(logger: logging.Logger, job: Any) -> JobLogAdapter:
    """Bind ``logger`` to a job (anything with ``job_id`` and ``study_instance_uid``)."""
    return JobLogAdapter(logger, {"study_uid": getattr(job, "study_instance_uid", None),
                                  "job_id": getattr(job, "job_id", None)})


class StructuredFormatter(logging.Formatter):
    """One line per record, JSON or ``key=value``, with the job context fields.

    Parameters
    ----------
    json_lines : bool
        Emit JSON objects (for log shippers) instead of readable lines.
    """

    def __init__(self, json_lines: bool = False) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record``."""
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields[name] = value
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.json_lines:
            return json.dumps(fields, default=str)
        ctx = " ".join(f"{k}={fields[k]}" for k in _CONTEXT_FIELDS if k in fields)
        line = f"{fields['ts']} {fields['level']:<7} {fields['logger']}: {fields['msg']}"
        if ctx:
            line += f" [{ctx}]"
        if "exc" in fields:
            line += "\n" + fields["exc"]
        return line


#: Set to ``json`` to log JSON lines (for log shippers) instead of readable lines.
LOG_FORMAT_ENV = "CAD_NODE_LOG_FORMAT"


def setup_logging(level: str = "INFO", json_lines: bool | None = None) -> None:
    """Install the structured formatter on the root logger (stderr).

    ``json_lines`` defaults to ``CAD_NODE_LOG_FORMAT=json`` in the environment.
    """
    if json_lines is None:
        json_lines = os.environ.get(LOG_FORMAT_ENV, "").lower() == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(json_lines))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # highdicom narrates every attribute it copies at INFO; keep its warnings only.
    for noisy in ("highdicom", "pynetdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
