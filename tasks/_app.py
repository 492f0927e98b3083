"""The Celery application, configured from ``celeryconfig``."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.app import backends
from celery.backends.redis import RedisBackend

from tasks._backend import TokenRedisBackend
from tasks._logs import hide_task_results_in_logs

__all__ = ["app"]


class SfoxCelery(Celery):  # type: ignore[misc]
    """Celery, with Redis results that honour a task's own ``result_ttl``.

    The backend is swapped here rather than through the ``result_backend``
    setting because ``CELERY_RESULT_BACKEND`` in the environment overrides that
    setting wherever Celery reads it. Broker connections go through
    :class:`tasks._kombu.Connection` (see that module).
    """

    amqp_cls = "tasks._kombu:AMQP"

    def _get_backend(self) -> Any:
        backend, url = backends.by_url(self.backend_cls or self.conf.result_backend, self.loader)
        if backend is RedisBackend:
            backend = TokenRedisBackend
        return backend(app=self, url=url)


app = SfoxCelery("tasks")
app.config_from_object("celeryconfig")
# Celery's "Task ... succeeded" line must not carry a result (sealed tokens, or worse).
hide_task_results_in_logs()
