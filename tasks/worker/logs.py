"""Celery's own log lines say that a task succeeded, never what it returned.

Celery logs each success as ``Task name[id] succeeded in 0.41s: <return value>``
(``celery.app.trace.LOG_SUCCESS``), and hands the same values to every handler as
structured data: ``extra={"data": {..., "return_value": ...}}``. A mint returns
sealed tokens, and a partner's downstream task may return anything at all, so
neither the text nor the structured record may carry the result.

:func:`hide_task_results_in_logs` runs when the app loads (see ``tasks.worker.app``):

- the success format loses its ``: <return value>`` tail, so the line reads
  ``Task sfox.mint_user_tokens[id] succeeded in 0.41s``;
- a filter on Celery's trace logger drops ``return_value`` from each record's
  arguments and from its ``data``, whatever format string is in use, so a JSON
  log handler that dumps ``record.data`` or ``record.args`` finds no result.

Tasks log their own one-line outcome instead (``mint done: ...``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from celery.app import trace

__all__ = ["SUCCESS_FORMAT", "HideReturnValue", "hide_task_results_in_logs"]

#: Celery's success line without the return value.
SUCCESS_FORMAT = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"

#: The key under which Celery passes the result's repr to its log call.
_RESULT_KEY = "return_value"
#: ``: %(return_value)s`` (any conversion flags) in a format string.
_RESULT_FIELD = re.compile(r"[:\s]*%\(" + _RESULT_KEY + r"\)[#0 +-]*\d*(?:\.\d+)?[a-zA-Z]")
#: Celery's task-tracing logger: the one that writes the success line.
_TRACE_LOGGER = "celery.app.trace"


class HideReturnValue(logging.Filter):
    """Removes a task's return value from a log record's text, arguments and ``data``."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, Mapping) and _RESULT_KEY in data:
            record.data = {k: v for k, v in data.items() if k != _RESULT_KEY}
        args = record.args
        if isinstance(args, Mapping) and _RESULT_KEY in args:
            record.args = {k: v for k, v in args.items() if k != _RESULT_KEY}
            if isinstance(record.msg, str):
                # Whatever the format says, it cannot ask for the value it no longer has.
                record.msg = _RESULT_FIELD.sub("", record.msg)
        return True


def hide_task_results_in_logs() -> None:
    """Keep results out of Celery's success line and its structured data (idempotent)."""
    trace.LOG_SUCCESS = SUCCESS_FORMAT
    logger = logging.getLogger(_TRACE_LOGGER)
    if not any(isinstance(f, HideReturnValue) for f in logger.filters):
        logger.addFilter(HideReturnValue())
