"""Celery's log lines say that a package task succeeded, never what it returned.

Celery logs each success as ``Task name[id] succeeded in 0.41s: <return value>``
(``celery.app.trace.LOG_SUCCESS``), and hands the same values to every handler as
structured data: ``extra={"data": {..., "return_value": ...}}``. A mint returns
sealed tokens, so for the package's own tasks (``sfox.*``) neither the text nor
the structured record may carry the result.

:func:`hide_task_results_in_logs` runs when the package loads (see
``tasks.worker.app``). It adds one filter to Celery's trace logger that, for
records of ``sfox.*`` tasks only, drops ``return_value`` from the record's
arguments and its ``data`` and cuts ``: <return value>`` out of whatever format
string is in use, so the line reads ``Task sfox.mint_user_tokens[id] succeeded
in 0.41s`` and a JSON handler that dumps ``record.data`` finds no result. Celery's
own format and every other task's lines are left exactly as the host has them.

Tasks log their own one-line outcome instead (``mint done: ...``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

__all__ = ["PACKAGE_TASKS", "HideReturnValue", "hide_task_results_in_logs"]

#: The name prefix of the package's tasks: only their records are touched.
PACKAGE_TASKS = "sfox."

#: The key under which Celery passes the result's repr to its log call.
_RESULT_KEY = "return_value"
#: ``: %(return_value)s`` (any conversion flags) in a format string.
_RESULT_FIELD = re.compile(r"[:\s]*%\(" + _RESULT_KEY + r"\)[#0 +-]*\d*(?:\.\d+)?[a-zA-Z]")
#: Celery's task-tracing logger: the one that writes the success line.
_TRACE_LOGGER = "celery.app.trace"


class HideReturnValue(logging.Filter):
    """Removes a package task's return value from a record's text, arguments and ``data``."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        args = record.args
        fields = data if isinstance(data, Mapping) else args
        if not isinstance(fields, Mapping) or not str(fields.get("name", "")).startswith(
            PACKAGE_TASKS
        ):
            return True
        if isinstance(data, Mapping) and _RESULT_KEY in data:
            record.data = {k: v for k, v in data.items() if k != _RESULT_KEY}
        if isinstance(args, Mapping) and _RESULT_KEY in args:
            record.args = {k: v for k, v in args.items() if k != _RESULT_KEY}
            if isinstance(record.msg, str):
                # Whatever the format says, it cannot ask for the value it no longer has.
                record.msg = _RESULT_FIELD.sub("", record.msg)
        return True


def hide_task_results_in_logs() -> None:
    """Keep package tasks' results out of Celery's success line and data (idempotent)."""
    logger = logging.getLogger(_TRACE_LOGGER)
    if not any(isinstance(f, HideReturnValue) for f in logger.filters):
        logger.addFilter(HideReturnValue())
