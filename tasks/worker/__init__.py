"""The Celery glue: the app, its result backend, logs, the per-process runtime and the mint task."""
