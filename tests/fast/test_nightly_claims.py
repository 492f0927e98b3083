"""Who runs a date, what the operator is shown, how the fan-out cuts a run: no Redis, no worker."""

from __future__ import annotations

import itertools
from datetime import date

import pytest

from tasks._redis import lua
from tasks.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tasks.cli.nightly import print_nightly
from tasks.fanout.tasks import CHUNKS_PER_SEGMENT, segments
from tasks.nightly.store import RUN_TTL, NightlyRun, RunBooks


class RecordingClient:
    """Stands in for a redis.Redis: each script call is recorded and answered with ``answer``."""

    def __init__(self, answer):
        self.answer = answer
        self.calls: list[tuple[str, list, list]] = []

    def register_script(self, source):
        def run(*, keys, args):
            self.calls.append((source, list(keys), list(args)))
            return self.answer

        return run


def test_take_passes_owner_lease_meta_then_task_token_ms_ttl():
    """take.lua: KEYS owner, lease, meta; ARGV task id, token, milliseconds, owner TTL."""
    client = RecordingClient([b"took", b"gone"])
    run = NightlyRun(client, date(2026, 12, 1))
    assert run.take("task-2", "tok", 2.5) == ("took", "gone")
    source, keys, args = client.calls[-1]
    assert source == lua("tasks.nightly", "take")
    assert keys == [run.owner, run.lease, run.meta]
    assert args == ["task-2", "tok", 2500, RUN_TTL]


def test_hand_over_and_release_name_their_keys():
    """hand_over.lua: KEYS lease; ARGV token, task, ms. release.lua: owner, lease, meta."""
    client = RecordingClient(1)
    run = NightlyRun(client, date(2026, 12, 1))
    run.hand_over("tok", "task-1", 30)
    assert client.calls[-1] == (
        lua("tasks.nightly", "hand_over"),
        [run.lease],
        ["tok", "task-1", 30000],
    )
    assert run.release("task-1", "tok") is True
    assert client.calls[-1] == (
        lua("tasks.nightly", "release"),
        [run.owner, run.lease, run.meta],
        ["task-1", "tok"],
    )


def books(**given):
    fields = {
        "run_date": "2026-12-01",
        "owner": None,
        "lease_left": 0.0,
        "started": None,
        "staged": False,
        "dispatched": False,
        "users": 0,
        "orders": 0,
        "skipped_rows": 0,
        "outcomes": {},
        "orders_file": None,
        "summary": None,
    }
    return RunBooks(**{**fields, **given})


@pytest.mark.parametrize(
    ("given", "phase"),
    [
        ({}, "not_started"),
        ({"owner": "t1", "lease_left": 1.5}, "under_way"),
        ({"owner": "t1"}, "stalled"),
        ({"staged": True}, "stalled"),
        ({"owner": "t1", "lease_left": 1.5, "summary": {"status": "done"}}, "finished"),
    ],
)
def test_a_runs_phase_follows_its_records(given, phase):
    """Finished once summed up; under way while a lease lives; claimed without one: stalled."""
    assert books(**given).phase == phase


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("skipped", EXIT_OK),
        ("under_way", EXIT_OK),
        ("handed_over", EXIT_OK),
        ("not_configured", EXIT_USAGE),
        ("unfinished", EXIT_FAILED),
    ],
)
def test_each_verdict_prints_one_line_and_its_exit_code(capsys, status, code):
    """A trigger that ran no part of the run: its status and reason on one line."""
    found = {"run_date": "2026-12-01", "status": status, "reason": "why"}
    assert print_nightly(found) == code
    assert capsys.readouterr().out == f"nightly run for 2026-12-01: {status}: why\n"


def test_segments_number_chunks_across_segments_and_read_lazily():
    """Chunk indexes run on across segments; no more than a segment's users is read ahead."""
    read: list[int] = []

    def users():
        for i in itertools.count():
            read.append(i)
            yield f"u{i}"

    cut = segments(users(), 3)
    first = next(cut)
    assert len(first) == CHUNKS_PER_SEGMENT
    assert [c.index for c in first] == list(range(CHUNKS_PER_SEGMENT))
    assert first[1].user_ids == ["u3", "u4", "u5"]
    assert len(read) == 3 * CHUNKS_PER_SEGMENT
    assert next(cut)[0].index == CHUNKS_PER_SEGMENT


def test_segments_of_a_short_list():
    """Seven users in chunks of three: one segment of 3, 3 and 1; none at all for none."""
    (only,) = segments([f"u{i}" for i in range(7)], 3)
    assert [len(c.user_ids) for c in only] == [3, 3, 1]
    assert list(segments([], 3)) == []
