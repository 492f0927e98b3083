"""The mint task: thin glue between Celery and the minting code.

Nothing here knows HTTP. The task validates its input and hands it to a
:class:`~tasks.minting.Minter`; a :class:`~tasks.minting.Deferred` (a wait too
long to sleep in a worker slot, or the end of the run's turn) becomes a broker
countdown that carries the work done so far (see :class:`tasks.worker.base.SfoxTask`).
The retry budget and deadline live in that carried state, so limiter waits
never count against it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

from celery import signals

from .._exceptions import ConfigurationError
from .._settings import Settings, check_celery_urls, is_plain_http_off_host
from ..budget.ratelimit import ON_DEMAND
from ..minting import MintResult, validate_user_ids
from .backend import backend_with_ttl
from .host import package_task, settings_for
from .outcome import MintOutcome, summarise
from .redelivery import MintOnce
from .runtime import get_runtime, reset_runtime
from .stores import check_stores

if TYPE_CHECKING:
    from .host import TaskDecorator

__all__ = ["PROGRESS_INTERVAL", "TASK_TIME_LIMIT", "MintTask", "longest_hold", "mint_user_tokens"]

logger = logging.getLogger("tasks.mint")


def _describe_ids(user_ids: Any) -> str:
    """A short, human argument repr for Flower and logs: count and the first few IDs."""
    if not isinstance(user_ids, (list, tuple)):
        return f"({type(user_ids).__name__})"
    head = ", ".join(str(u)[:40] for u in user_ids[:3])
    more = f", … +{len(user_ids) - 3}" if len(user_ids) > 3 else ""
    return f"[{len(user_ids)} user IDs: {head}{more}]"


#: Least seconds between two PROGRESS states a mint task stores (the last batch always is).
PROGRESS_INTERVAL = 0.5


def _progress_reporter(task: MintTask) -> Any:
    """A :data:`~tasks.minting.ProgressHook` storing ``PROGRESS {done, total}``, throttled.

    Counts only, never a token; a backend that cannot store it costs the mint nothing.
    Outside a worker (called directly, eager) there is nobody to tell.
    """
    if task.request.called_directly or task.request.is_eager or not task.request.id:
        return None
    last = [float("-inf")]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < PROGRESS_INTERVAL:
            return
        last[0] = now
        try:
            task.update_state(state="PROGRESS", meta={"done": done, "total": total})
        except Exception as exc:  # the backend is down: the mint itself goes on
            logger.debug("cannot store the mint's progress: %s", exc)

    return report


#: Seconds after which a worker kills a package task that outlived its turn anyway: the
#: turn (SFOX_TASK_TURN) plus requests in flight end a run within about a minute.
TASK_TIME_LIMIT = 600


class MintTask(MintOnce):
    """Base of ``sfox.mint_user_tokens``: runs once per task id, validates early, short results."""

    time_limit = TASK_TIME_LIMIT
    #: A partner's live mint: ahead of batch work, at the broker and at the limiter.
    lane = ON_DEMAND
    #: Keep the human "succeeded" line and task events short: a result holds ciphertext.
    resultrepr_maxsize = 160

    @property
    def result_ttl(self) -> int:
        """Seconds the result may live in the backend (read by the result backend)."""
        return get_runtime(self.app).settings.result_ttl

    @property
    def backend(self) -> Any:
        """The running app's result backend, writing this task's results with their TTL.

        In a partner's app (plain Celery Redis backend) as in ``tasks.app``. A backend
        that cannot expire one result early (a database) keeps it until its own cleanup;
        the sealed token inside stops opening after ``SFOX_TOKEN_RESULT_TTL`` all the same.
        """
        return backend_with_ttl(self._backend or self.app.backend, self.app)

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        # Refuse bad input at the call, before anything is queued.
        user_ids = (args or [None])[0] if args else (kwargs or {}).get("user_ids")
        validate_user_ids(user_ids, maximum=get_runtime(self.app).settings.max_user_ids)
        options.setdefault("argsrepr", _describe_ids(user_ids))
        options.setdefault(
            "kwargsrepr", "{}" if not (kwargs or {}).get("_resume") else "{resume: …}"
        )
        options.setdefault("expires", None)
        return super().apply_async(args, kwargs, **options)


# Typed for users who have Celery's stubs (celery-types): ``mint_user_tokens.delay([...])
# .get()`` is a ``MintResult`` (tasks.worker.host.TaskDecorator).
@cast(
    "TaskDecorator[[list[str]], MintResult]",
    package_task(bind=True, base=MintTask, name="sfox.mint_user_tokens"),
)
def mint_user_tokens(
    self: MintTask, user_ids: list[str], _resume: dict[str, Any] | None = None
) -> MintResult | MintOutcome:
    """Mint sealed sFOX user auth tokens for ``user_ids``: ``{"tokens": [..], "failed": [..]}``."""
    runtime = get_runtime(self.app)
    distinct = validate_user_ids(user_ids, maximum=runtime.settings.max_user_ids)
    started = time.monotonic()
    result = runtime.minter().mint(distinct, _resume, on_progress=_progress_reporter(self))
    logger.info(
        "mint done for %d user(s) in %.2f s: %s",
        len(distinct),
        time.monotonic() - started,
        summarise(result),
    )
    if self.request.called_directly or self.request.is_eager:
        return result
    # In a worker, Celery reprs the result for its event and Flower: make that repr short.
    return MintOutcome(result)


def _worker_app(sender: Any) -> Any:
    """The app a worker signal is about: the worker's own (a partner's, embedded)."""
    return sender.app


@signals.worker_init.connect
def _check_settings(sender: Any = None, **_: Any) -> None:
    """Refuse to start a worker whose sFOX settings are wrong, saying which and why.

    A worker needs a Redis that every worker shares, for the limiter and the run
    books: without one each process would spend sFOX's whole budget on its own.
    Only a worker on an in-process broker (``memory://``: nothing else can reach
    it) may keep an in-process budget. A broker or result backend URL that is no URL
    at all (``rediss//host``) is refused here, naming the setting, rather than later
    as a failed host-name lookup.
    """
    app = _worker_app(sender)
    try:
        check_celery_urls(app.conf, app_name=app.main)
        in_process = str(app.conf.broker_url or "").startswith("memory://")
        settings_for(app).require_limiter_url(shared=not in_process)
    except ConfigurationError as exc:
        logger.critical("refusing to start: %s", exc.message)
        raise SystemExit(f"sfox-tokens: {exc.message}") from None


@signals.celeryd_after_setup.connect
def _announce_settings(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Say at start-up, once logging is set up, where minting goes and what is off."""
    # worker_init (above) runs before the worker configures logging: lines logged
    # there never reach the worker's log.
    conf = _worker_app(instance).conf
    settings = settings_for(_worker_app(instance))
    if is_plain_http_off_host(settings.api_url):
        logger.warning(
            "SFOX_API_URL %s is plain http:// (allowed by SFOX_PLAIN_HTTP_HOSTS): "
            "for a local sFOX stand-in only, never with a real enterprise key",
            settings.api_url,
        )
    visibility = float((conf.get("broker_transport_options") or {}).get("visibility_timeout", 3600))
    longest = longest_hold(settings)
    if str(conf.broker_url or "").startswith(("redis", "sentinel")) and visibility <= longest:
        logger.warning(
            "SFOX_VISIBILITY_TIMEOUT=%g s is not above the longest a task holds its message "
            "(%g s: its turn, requests in flight, and a Retry-After countdown): Redis may "
            "hand a running task to a second worker",
            visibility,
            longest,
        )
    if not settings.api_key:
        logger.warning(
            "no sFOX enterprise key (SFOX_ENTERPRISE_API_KEY): mint tasks will fail until set"
        )
    budget = (
        f"the budget {settings.rate_limit_scope!r}"
        if settings.rate_limit_scope
        else "one budget for all workers"
    )
    logger.info(
        "sFOX at %s; %s requests in %s; sending from %s; batches of %d, up to %d at once "
        "per mint task; results live %d s",
        settings.api_url,
        settings.rate,
        budget,
        settings.source_address or "the host's default address",
        settings.batch_size,
        settings.mint_concurrency,
        settings.result_ttl,
    )
    logger.info(
        "lanes: on-demand mints on %s go ahead of batch work on %s; batch work keeps %g%% "
        "of each window",
        settings.queue,
        settings.batch_queue_name,
        settings.batch_share * 100,
    )
    _check_stores(conf, settings)


def _check_stores(conf: Any, settings: Settings) -> None:
    """Warn about every Redis in use that may evict; refuse a Redis Cluster under the limiter."""
    try:
        check_stores(conf, settings)
    except ConfigurationError as exc:
        logger.critical("refusing to start: %s", exc.message)
        raise SystemExit(f"sfox-tokens: {exc.message}") from None


def longest_hold(settings: Settings) -> float:
    """Seconds a package task may hold its message: a turn, then a countdown at most.

    A run stops starting requests after its turn; those in flight end within their
    timeouts, and a broker countdown waits at most the longest ``Retry-After``.
    """
    request = settings.connect_timeout + settings.read_timeout
    in_place = settings.retry.inprocess_wait_max
    return settings.task_turn + request + in_place + settings.retry.retry_after_max


@signals.worker_process_init.connect
def _fresh_runtime(**_: Any) -> None:
    """A forked pool process builds its own session and Redis pool."""
    reset_runtime()
