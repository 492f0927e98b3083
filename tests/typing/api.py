"""The public API as a user writes it, checked by ``mypy --strict`` with celery-types.

Not run: ``tests/test_typing.py`` type-checks it against the installed package. Every
line here must pass; a wrong type makes mypy fail.
"""

from __future__ import annotations

from celery import Celery, Signature

from tasks import (
    FailedEntry,
    MintResult,
    RunProgress,
    SfoxError,
    TokenEntry,
    mint_user_tokens,
    run_progress,
    unseal,
    with_user_tokens,
)

app = Celery("partner")


@app.task
def place(user_token: TokenEntry) -> str:
    return unseal(user_token["token"])


def mint_one(user_id: str) -> str:
    result: MintResult = mint_user_tokens.delay([user_id]).get(timeout=60)
    tokens: list[TokenEntry] = result["tokens"]
    failed: list[FailedEntry] = result["failed"]
    for refused in failed:
        status: int | None = refused["status"]
        reason: str = refused["error"]
        raise SfoxError(f"{refused['user_id']}: {status} {reason}")
    sealed: str = tokens[0]["token"]
    expires: str = tokens[0]["expires"]
    assert expires
    plaintext: str = unseal(sealed)
    return plaintext


def mint_queued(user_ids: list[str]) -> MintResult:
    return mint_user_tokens.apply_async((user_ids,), queue="sfox").get()


def tokens_for_jobs(user_ids: list[str]) -> str:
    canvas: Signature[object] = with_user_tokens(user_ids, place.s(), ahead=2, run_id="r1")
    canvas.apply_async()
    progress: RunProgress = run_progress("r1")
    finished: bool = progress.finished
    return f"{progress} {finished}"
