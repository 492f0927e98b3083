"""The project's Celery app, configured from Django's settings (the ``CELERY_`` names)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "partnerproj.settings")

# include=["sfox_tokens"]: this project's workers run the sFOX token tasks too, with this
# app's broker and result backend. The package routes its own tasks to its queue
# ("sfox", SFOX_QUEUE), so workers consume it beside Celery's default one:
#     celery -A partnerproj worker -Q celery,sfox
# "sfox_tokens" is the package's collision-free name; "tasks" is the same package, and
# would clash with any top-level tasks module of a project.
app = Celery("partnerproj", include=["sfox_tokens"])
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
