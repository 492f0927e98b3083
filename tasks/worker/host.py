"""Which Celery app the package works through: the one that runs it, never its own by default.

The package lives inside a partner's Celery app. Its tasks are registered with
every app in the process (:func:`package_task`, on top of Celery's
``shared_task``), each copy bound to that app and its configuration. The names
the package exports (``mint_user_tokens``, ...) resolve, at each use, to the
task of :func:`calling_app`:

1. inside a running task, the app that runs it;
2. else the host's current or default app (the one a partner created, or a
   Django project's, which Celery's Django fix-up makes the default);
3. only where the process has no app of its own (a plain script, the CLI, a
   worker started with ``celery -A tasks``), the package's own app.

Celery does not say in public whether a process has an app of its own: asking
for ``current_app`` creates a fallback app (``"default"``, on amqp://localhost)
when there is none. So :func:`calling_app` reads Celery's thread state directly,
here and nowhere else (``celery._state._tls.current_app`` and
``celery._state.default_app``; pinned by ``tests/test_celery_internals.py``).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery, current_task, shared_task
from celery import _state as celery_state
from celery.local import Proxy

from .._settings import Settings

__all__ = ["calling_app", "package_task", "settings_for"]

if TYPE_CHECKING:
    from typing import ParamSpec, Protocol, TypeVar

    from celery import Task

    _P = ParamSpec("_P")
    _R_co = TypeVar("_R_co", covariant=True)

    class TaskDecorator(Protocol[_P, _R_co]):
        """What ``package_task(...)`` returns: it makes a function a ``Task[_P, _R_co]``.

        With Celery's stubs (``celery-types``), ``Task[_P, _R_co]`` types ``.delay(...)``
        and ``.apply_async(...)`` and the ``.get()`` of their results; without them (this
        package's own check) it is ``Any``. An exported task is typed for users by casting
        ``package_task(...)`` to ``TaskDecorator[[<its arguments>], <its result>]``.
        Nothing of it exists at run time.
        """

        def __call__(self, fun: Callable[..., Any], /) -> Task[_P, _R_co]: ...


#: The package's own app, set by :mod:`tasks.worker.app` once it exists.
_package_app: Celery | None = None


def set_package_app(app: Celery) -> None:
    """Name the app :func:`calling_app` falls back to (the package's own)."""
    global _package_app
    _package_app = app


def _is_fallback(app: Any) -> bool:
    """Celery's own stand-in app, made when someone asked for ``current_app`` and none existed."""
    return getattr(app, "main", None) == "default" and not getattr(app, "fixups", None)


def host_app() -> Celery | None:
    """The host's own app in this thread (current, else default), if it has one."""
    for app in (celery_state._tls.current_app, celery_state.default_app):
        if app is not None and not _is_fallback(app):
            return app
    return None


def calling_app() -> Celery:
    """The app the package works through here: the running task's, the host's, else its own."""
    if current_task:
        return current_task.app
    app = host_app()
    if app is not None:
        return app
    if _package_app is None:  # pragma: no cover - tasks.worker.app sets it on import
        raise RuntimeError("the package's Celery app is not created yet")
    return _package_app


def package_task(**options: Any) -> TaskDecorator[..., Any]:
    """Register a task with every Celery app; the name returned resolves to the caller's.

    Celery's ``shared_task`` adds the task to each app as it is finalized (a
    partner's, the package's own), bound to that app. The object returned is a
    proxy to the task in :func:`calling_app`, so ``mint_user_tokens.delay(...)``
    sends through the caller's app, with its broker and result backend.
    """
    name = options["name"]

    def register(fun: Callable[..., Any]) -> Any:
        shared_task(**options)(fun)
        return Proxy(lambda: calling_app().tasks[name])

    return register


_lock = threading.Lock()
_settings: weakref.WeakKeyDictionary[Celery, tuple[int, Settings]] = weakref.WeakKeyDictionary()


def settings_for(app: Celery) -> Settings:
    """The package's settings as ``app`` runs it, resolved once per app and process."""
    with _lock:
        found = _settings.get(app)
        if found is not None and found[0] == os.getpid():
            return found[1]
    settings = Settings.from_conf(app.conf, app_name=app.main)
    with _lock:
        _settings[app] = (os.getpid(), settings)
    return settings


def forget_settings() -> None:
    """Resolve every app's settings again at next use (their configuration changed)."""
    with _lock:
        _settings.clear()
