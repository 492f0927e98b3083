"""The Celery tasks: thin glue between Celery and the minting code.

Nothing here knows HTTP. The task validates its input, hands it to a
:class:`~tasks._mint.Minter`, and turns a :class:`~tasks._mint.Deferred`
(a wait too long to sleep in a worker slot) into a Celery retry with a
countdown that carries the work done so far. Celery's own ``max_retries`` is
off for this task: the retry budget and deadline live in that carried state,
so limiter waits never count against it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, signals

from tasks._app import app
from tasks._exceptions import ConfigurationError
from tasks._mint import Deferred, MintResult, validate_user_ids
from tasks._outcome import MintOutcome, summarise
from tasks._runtime import get_runtime, reset_runtime
from tasks._settings import Settings, is_plain_http_off_host

__all__ = ["MintTask", "mint_user_tokens"]

logger = logging.getLogger("tasks.mint")


def _describe_ids(user_ids: Any) -> str:
    """A short, human argument repr for Flower and logs: count and the first few IDs."""
    if not isinstance(user_ids, (list, tuple)):
        return f"({type(user_ids).__name__})"
    head = ", ".join(str(u)[:40] for u in user_ids[:3])
    more = f", … +{len(user_ids) - 3}" if len(user_ids) > 3 else ""
    return f"[{len(user_ids)} user IDs: {head}{more}]"


class MintTask(Task):  # type: ignore[misc]
    """Base of ``sfox.mint_user_tokens``: early validation, short reprs, short-lived result."""

    #: Celery's counter is off; the carried budget bounds retries instead.
    max_retries = None
    #: Killed past this: far beyond minting's own deadline (SFOX_RETRY_DEADLINE).
    time_limit = 3600
    #: Keep the human "succeeded" line and task events short: a result holds ciphertext.
    resultrepr_maxsize = 160

    @property
    def result_ttl(self) -> int:
        """Seconds the result may live in the backend (read by the result backend)."""
        return get_runtime(self.app.conf).settings.result_ttl

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        # Refuse bad input at the call, before anything is queued.
        user_ids = (args or [None])[0] if args else (kwargs or {}).get("user_ids")
        validate_user_ids(user_ids, maximum=get_runtime(self.app.conf).settings.max_user_ids)
        options.setdefault("argsrepr", _describe_ids(user_ids))
        options.setdefault(
            "kwargsrepr", "{}" if not (kwargs or {}).get("_resume") else "{resume: …}"
        )
        options.setdefault("expires", None)
        return super().apply_async(args, kwargs, **options)


@app.task(bind=True, base=MintTask, name="sfox.mint_user_tokens", acks_late=True)
def mint_user_tokens(
    self: MintTask, user_ids: list[str], _resume: dict[str, Any] | None = None
) -> MintResult | MintOutcome:
    """Mint sealed sFOX user auth tokens for ``user_ids``: ``{"tokens": [..], "failed": [..]}``."""
    runtime = get_runtime(self.app.conf)
    distinct = validate_user_ids(user_ids, maximum=runtime.settings.max_user_ids)
    started = time.monotonic()
    try:
        result = runtime.minter().mint(distinct, _resume)
    except Deferred as deferred:
        logger.info(
            "mint of %d user(s) resumes from the broker in %.1f s (%s)",
            len(distinct),
            deferred.countdown,
            deferred.reason,
        )
        raise self.retry(
            kwargs={"_resume": deferred.state},
            countdown=deferred.countdown,
            kwargsrepr="{resume: …}",
        ) from None
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


@signals.worker_init.connect
def _check_settings(**_: Any) -> None:
    """Refuse to start a worker whose sFOX settings are wrong, saying which and why."""
    try:
        Settings.from_conf(app.conf)
    except ConfigurationError as exc:
        logger.critical("refusing to start: %s", exc.message)
        raise SystemExit(f"sfox-tokens: {exc.message}") from None


@signals.celeryd_after_setup.connect
def _announce_settings(**_: Any) -> None:
    """Say at start-up, once logging is set up, where minting goes and what is off."""
    # worker_init (above) runs before the worker configures logging: lines logged
    # there never reach the worker's log.
    settings = Settings.from_conf(app.conf)
    if is_plain_http_off_host(settings.api_url):
        logger.warning(
            "SFOX_API_URL %s is plain http:// (allowed by SFOX_PLAIN_HTTP_HOSTS): "
            "for a local sFOX stand-in only, never with a real enterprise key",
            settings.api_url,
        )
    visibility = float((app.conf.broker_transport_options or {}).get("visibility_timeout", 3600))
    longest = settings.retry.deadline + settings.retry.retry_after_max
    if app.conf.broker_url.startswith(("redis", "rediss")) and visibility <= longest:
        logger.warning(
            "SFOX_VISIBILITY_TIMEOUT=%g s is not above the longest mint (%g s deadline plus "
            "%g s Retry-After): Redis may hand a running task to a second worker",
            visibility,
            settings.retry.deadline,
            settings.retry.retry_after_max,
        )
    if not settings.api_key:
        logger.warning(
            "no sFOX enterprise key (SFOX_ENTERPRISE_API_KEY): mint tasks will fail until set"
        )
    logger.info(
        "sFOX at %s; %s requests shared by all workers; batches of %d, up to %d at once "
        "per mint task; results live %d s",
        settings.api_url,
        settings.rate,
        settings.batch_size,
        settings.mint_concurrency,
        settings.result_ttl,
    )


@signals.worker_process_init.connect
def _fresh_runtime(**_: Any) -> None:
    """A forked pool process builds its own session and Redis pool."""
    reset_runtime()
