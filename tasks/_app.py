"""The Celery application, configured from ``celeryconfig``."""

from __future__ import annotations

from celery import Celery

__all__ = ["app"]

app = Celery("tasks")
app.config_from_object("celeryconfig")
