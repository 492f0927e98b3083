"""with_user_tokens end to end: a partner's own downstream task behind token minting."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter

import pytest

from tasks import with_user_tokens
from tasks.fanout.store import JitRun
from tests.conftest import REDIS_URL
from tests.services import eventually
from tests.testtasks import flaky_downstream, record_token, runs_by_user

pytestmark = pytest.mark.slow


def test_each_granted_user_reaches_downstream_once_with_its_own_token(
    worker, fake_sfox, redis_client
):
    """350 users, one refused: 349 downstream calls, each with that user's own token."""
    ids = [f"partner-{i}" for i in range(350)]
    fake_sfox.refuse("partner-123", status=404, message="user not found")
    run_id = "wut-basic"
    with_user_tokens(ids, record_token.s("basic"), run_id=run_id, chunk_size=50).apply_async()
    run = JitRun(redis_client, run_id)
    assert eventually(lambda: run.progress().finished, timeout=60)
    seen = {
        k.decode(): v.decode() for k, v in redis_client.hgetall("tests:downstream:basic").items()
    }
    runs = runs_by_user(redis_client, "basic")
    assert set(seen) == set(ids) - {"partner-123"}
    assert set(runs) == set(seen) and set(runs.values()) == {1}
    issued = {
        u: hashlib.sha256(t.encode()).hexdigest() for t, (u, _) in fake_sfox.issued_tokens.items()
    }
    assert all(seen[u] == issued[u] for u in seen)
    assert run.failed() == {
        "partner-123": {"user_id": "partner-123", "status": 404, "error": "user not found"}
    }


def test_minting_stays_a_bounded_number_of_chunks_ahead(worker, fake_sfox, redis_client):
    """With a slow downstream, released-but-unfinished users never exceed ahead+1 chunks."""
    ids = [f"jit-{i}" for i in range(300)]
    run_id = "wut-jit"
    run = JitRun(redis_client, run_id)
    peaks: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            p = run.progress()
            peaks.append(p.inflight + p.dispatched - p.done)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with_user_tokens(
            ids, record_token.s("jit", delay=0.01), run_id=run_id, chunk_size=10, ahead=2
        ).apply_async()
        assert eventually(lambda: run.progress().finished, timeout=90)
    finally:
        stop.set()
        watcher.join()
    assert max(peaks) <= (2 + 1) * 10
    # Minting was spread over the run, not done up front: many token requests, few at once.
    assert fake_sfox.count("/v1/enterprise/user-tokens") == 30


@pytest.mark.parametrize("bad", ["u1", [], ["ok", ""], [3], None])
def test_bad_user_ids_raise_at_the_call(worker, fake_sfox, redis_client, bad):
    """Bad user_ids raise ValueError when the canvas is built; nothing is queued or sent."""
    with pytest.raises(ValueError):
        with_user_tokens(bad, record_token.s("bad"))
    assert redis_client.llen("sfox") == 0 and fake_sfox.count() == 0


def test_downstream_must_be_a_signature(worker):
    """A downstream that is not a Celery signature is refused at the call."""
    with pytest.raises(ValueError, match="signature"):
        with_user_tokens(["a"], "tests.record_token")


def test_no_message_holds_the_whole_list(worker, fake_sfox):
    """A large list is cut into segment messages, none holding all the users."""
    ids = [f"big-{i}" for i in range(12_000)]
    canvas = with_user_tokens(ids, record_token.s("big"))
    sizes = [sum(len(c.split("|", 2)[2]) for c in sig.args[2]) for sig in canvas.tasks]
    assert len(canvas.tasks) > 1
    assert max(sizes) < sum(sizes) / 2
    assert REDIS_URL  # the canvas was built without sending anything
    assert fake_sfox.count() == 0


def test_chunk_released_but_never_sent_is_sent_again(redis_client):
    """A chunk whose releasing task died before sending it comes back from a sweep, once due."""
    from tasks.fanout.store import Chunk

    run = JitRun(redis_client, "wut-lost")
    chunks = [Chunk(0, ["a", "b"]), Chunk(1, ["c", "d"])]
    spec = {"total": 4, "budget": 10, "stale_after": 0.3, "downstream": "{}"}
    released = run.stage(0, chunks, spec)
    assert [c.index for c in released] == [0, 1]
    # Chunk 0 is minted and finished; chunk 1's sender "dies" before sending it.
    run.finish_chunk(released[0], dispatched=2, failed=0)
    assert run.sweep() == []  # not yet due
    time.sleep(0.4)
    again = run.sweep()
    assert [(c.index, c.user_ids) for c in again] == [(1, ["c", "d"])]
    assert run.sweep() == []  # re-stamped: not sent twice in a row
    run.finish_chunk(again[0], dispatched=2, failed=0)
    run.user_done("a"), run.user_done("b"), run.user_done("c"), run.user_done("d")
    assert run.progress().finished


def test_redelivered_task_sends_again_the_chunks_it_took(redis_client):
    """A task redelivered after dying between taking chunks and sending them gets them back."""
    from tasks.fanout.store import Chunk

    run = JitRun(redis_client, "wut-redelivered")
    chunks = [Chunk(0, ["a"]), Chunk(1, ["b"]), Chunk(2, ["c"])]
    spec = {"total": 3, "budget": 2, "stale_after": 3600, "downstream": "{}"}
    taken = run.stage(0, chunks, spec, sender="segment-task")
    assert [c.index for c in taken] == [0, 1]
    # Another task finds nothing of its own to resend, and no room for more.
    assert run.sweep(sender="other-task") == []
    # The segment task, redelivered with the same id, is handed its two chunks again.
    again = run.stage(0, chunks, spec, sender="segment-task")
    assert [c.index for c in again] == [0, 1]
    # Once a chunk is finished it is nobody's to resend.
    run.finish_chunk(again[0], dispatched=1, failed=0, sender="chunk-task-0")
    assert [c.index for c in run.sweep(sender="segment-task")] == [1]


def _jit_done_runs(events, run_id: str) -> int:
    return sum(
        1
        for e in events.events
        if e.get("type") == "task-received"
        and e.get("name") == "sfox.jit_done"
        and run_id in str(e.get("args", ""))
    )


def test_every_end_of_a_downstream_task_marks_its_user_done(
    worker, fake_sfox, redis_client, events
):
    """Successes, failures, retries, Ignore and replace: each user is marked done at its end.

    On a worker that imports ``tasks``, a success (or ``Ignore``) is marked by
    the worker that ran it (no extra task); a failure by the ``sfox.jit_done``
    errback. A retry is no end: the run finishes only after the retried attempt.
    """
    ids = [f"end-{i}" for i in range(40)]
    fails, retries = ["end-3", "end-27"], ["end-5", "end-38"]
    ignored, replaced = ["end-11"], ["end-12", "end-33"]
    tag = "ends"
    run_id = f"wut-{tag}-{time.time_ns()}"
    run = JitRun(redis_client, run_id)
    with_user_tokens(
        ids,
        flaky_downstream.s(
            tag,
            fail=fails,
            retry_once=retries,
            retry_countdown=1.0,
            ignore=ignored,
            replace=replaced,
        ),
        run_id=run_id,
        chunk_size=10,
        ahead=1,
    ).apply_async()
    assert eventually(lambda: run.progress().finished, timeout=90)
    # Finished means ended: the retried users' second attempts have already run
    # (a replaced user is done when handed over, so its replacement may still be running).
    ok = {m.decode() for m in redis_client.smembers(f"tests:flaky-ok:{tag}")}
    assert set(retries) <= ok
    assert eventually(lambda: redis_client.scard(f"tests:flaky-ok:{tag}") == 37, timeout=10)
    ok = {m.decode() for m in redis_client.smembers(f"tests:flaky-ok:{tag}")}
    assert ok == set(ids) - set(fails) - set(ignored)
    attempts = {
        k.decode(): int(v) for k, v in redis_client.hgetall(f"tests:flaky-attempts:{tag}").items()
    }
    assert {u: n for u, n in attempts.items() if n != 1} == {u: 2 for u in retries + replaced}
    progress = run.progress()
    assert (progress.done, progress.dispatched, progress.failed) == (40, 40, 0)
    time.sleep(1.0)  # let the last events arrive
    # Only the failures sent a sfox.jit_done task: every other end was marked in place.
    assert _jit_done_runs(events, run_id) == len(fails)


def _attempts(redis_client, tag: str) -> dict[str, int]:
    raw = redis_client.hgetall(f"tests:flaky-attempts:{tag}")
    return {k.decode(): int(v) for k, v in raw.items()}


def _finished_run(redis_client, tag: str, ids: list[str]) -> str:
    """A finished run of flaky_downstream over ``ids`` (one chunk of 10 each): its id."""
    run_id = f"wut-{tag}-{time.time_ns()}"
    with_user_tokens(ids, flaky_downstream.s(tag), run_id=run_id, chunk_size=10).apply_async()
    assert eventually(lambda: JitRun(redis_client, run_id).progress().finished, timeout=60)
    assert eventually(lambda: set(_attempts(redis_client, tag)) == set(ids), timeout=10)
    return run_id


def test_a_chunk_task_that_runs_again_sends_no_user_twice(worker, fake_sfox, redis_client):
    """A second chunk task (a new id, its tokens in hand) finds every user recorded as sent."""
    from tasks.fanout.store import Chunk
    from tasks.fanout.tasks import jit_mint_chunk

    ids = [f"again-{i}" for i in range(10)]
    run_id = _finished_run(redis_client, "chunk-again", ids)
    minted = {
        "tokens": [{"partner_user_id": u, "token": "", "expires": ""} for u in ids],
        "failed": [],
    }
    # As a chunk task taking over a stale chunk, or redelivered after minting, would run.
    again = jit_mint_chunk.apply_async(
        (run_id, Chunk(0, ids).encode()), kwargs={"_resume": {"minted": minted}}
    ).get(timeout=30)
    assert again["sent"] == 0  # counted by the sending loop: nothing was published
    assert set(_attempts(redis_client, "chunk-again").values()) == {1}


def test_a_user_sent_again_on_purpose_runs_again(worker, fake_sfox, redis_client):
    """The nightly run's resend (a new id, the same user) runs: the transport drops none."""
    from tasks import app
    from tasks.fanout.api import FanOut

    ids = [f"resent-{i}" for i in range(10)]
    run_id = _finished_run(redis_client, "resend", ids)
    FanOut(app, run_id).resend(["resent-3", "resent-7"])
    assert eventually(
        lambda: (
            _attempts(redis_client, "resend")
            == {u: 2 if u in ("resent-3", "resent-7") else 1 for u in ids}
        ),
        timeout=30,
    )


def test_a_resumed_chunk_task_that_sends_a_user_again_runs_it_once(worker, fake_sfox, redis_client):
    """A chunk task resumed with its tokens in hand sends the same messages: each runs once.

    Around a failover, publishes refused as unreplicated can stand; the chunk task goes
    back to the broker, resumes (perhaps in another process) and sends the users its
    books do not record again. Each user's task has one id in a run, so the resend is
    the same message, and the package's Redis transport hands it over once.
    """
    from tasks.fanout.store import Chunk
    from tasks.fanout.tasks import downstream_task_id, jit_mint_chunk

    ids = [f"same-{i}" for i in range(10)]
    run_id = _finished_run(redis_client, "resumed", ids)
    minted = {
        "tokens": [{"partner_user_id": u, "token": "", "expires": ""} for u in ids],
        "failed": [],
    }
    sent_users = JitRun(redis_client, run_id).sent_users
    for resumes in range(2):
        redis_client.delete(sent_users)  # its records refused
        jit_mint_chunk.apply_async(  # a resume keeps its task id; its retry count goes up
            (run_id, Chunk(0, ids).encode()),
            kwargs={"_resume": {"minted": minted}},
            task_id=f"{run_id}-chunk",
            retries=resumes,
        )
        assert eventually(lambda: redis_client.scard(sent_users) == len(ids), timeout=30)
    # The first run's tasks carried tokens: those are other messages, and ran before.
    assert eventually(lambda: set(_attempts(redis_client, "resumed").values()) == {2}, timeout=30)
    time.sleep(1.5)  # a second copy would run within this
    assert set(_attempts(redis_client, "resumed").values()) == {2}
    assert downstream_task_id(run_id, "same-1") == downstream_task_id(run_id, "same-1")
    assert downstream_task_id(run_id, "same-1") != downstream_task_id(run_id, "same-2")


def test_a_chunk_task_delivered_again_sends_the_tokens_it_minted(worker, fake_sfox, redis_client):
    """A chunk task delivered again, without its progress, sends its first tokens: once each.

    Around a failover a chunk task's publishes can stand while its records and its
    return to the broker are refused: its message is put back as it was, with no
    ``_resume``. Run again, it finds the mint result it kept, sends the same messages
    (which the transport hands over once) and mints nothing.
    """
    from tasks import app
    from tasks.fanout.store import Chunk
    from tasks.fanout.tasks import jit_mint_chunk, run_spec

    tag = "again-kept"
    ids = [f"kept-{i}" for i in range(10)]
    run_id = f"wut-{tag}-{time.time_ns()}"
    run = JitRun(redis_client, run_id)
    spec = run_spec(app, flaky_downstream.s(tag), total=len(ids), chunk_size=10, ahead=1)
    [chunk] = run.stage(0, [Chunk(0, ids)], spec, sender="test")
    for delivery in range(2):
        jit_mint_chunk.apply_async(
            (run_id, chunk.encode()), task_id=f"{run_id}-chunk", retries=delivery
        )
        assert eventually(lambda: redis_client.scard(run.sent_users) == len(ids), timeout=30)
        assert eventually(lambda: set(_attempts(redis_client, tag)) == set(ids), timeout=30)
        # Its records refused: the chunk is not finished, its users not recorded as sent.
        redis_client.srem(run.finished_set, chunk.index)
        redis_client.delete(run.sent_users)
    time.sleep(1.5)  # a second copy would run within this
    assert set(_attempts(redis_client, tag).values()) == {1}
    minted = Counter(u for u, _ in fake_sfox.issued_tokens.values() if u.startswith("kept-"))
    assert minted == dict.fromkeys(ids, 1)
