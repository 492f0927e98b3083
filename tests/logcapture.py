"""For test workers: every log record, as structured data, in a JSON-lines file.

Included with ``--include tests.logcapture``; active only when
``SFOX_TEST_RECORDS_FILE`` names the file. It stands for any structured log
handler (JSON logs shipped to a log store) that dumps a record's ``args`` and the
``data`` Celery passes as ``extra``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from celery import signals

PATH_ENV = "SFOX_TEST_RECORDS_FILE"


class JsonRecords(logging.Handler):
    """Appends each record's logger, format, arguments, ``data`` and message as one JSON line."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.DEBUG)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        args: Any = record.args
        entry = {
            "logger": record.name,
            "msg": str(record.msg),
            "args": args if isinstance(args, dict) else list(args or ()),
            "data": getattr(record, "data", None),
            "message": record.getMessage(),
        }
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry, default=repr) + "\n")


@signals.after_setup_logger.connect
def _install(**_: Any) -> None:
    path = os.environ.get(PATH_ENV)
    root = logging.getLogger()
    if path and not any(isinstance(h, JsonRecords) for h in root.handlers):
        root.addHandler(JsonRecords(path))
