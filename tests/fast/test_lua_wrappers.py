"""Each Lua script's Python wrapper passes the KEYS and ARGV its .lua file names, in order."""

from __future__ import annotations

from datetime import date

from tasks._redis import lua, script
from tasks._settings import Rate
from tasks.budget.ratelimit import PACE_AHEAD, RedisLimiter
from tasks.fanout.store import Chunk, JitRun
from tasks.nightly.store import NightlyRun


class RecordingClient:
    """Stands in for a redis.Redis: every registered script records its calls."""

    def __init__(self, answer=0):
        self.answer = answer
        self.registered: list[str] = []
        self.calls: list[tuple[str, list, list]] = []

    def register_script(self, source):
        self.registered.append(source)

        def run(*, keys, args):
            self.calls.append((source, list(keys), list(args)))
            return self.answer

        return run


def test_a_script_is_registered_once_per_client():
    """The same source on the same client is one registration."""
    client = RecordingClient()
    assert script(client, "return 1") is script(client, "return 1")
    assert client.registered == ["return 1"]
    RedisLimiter(client, Rate.parse("10/1s"))
    RedisLimiter(client, Rate.parse("10/1s"))
    assert len(client.registered) == 4


def test_the_limiters_scripts_get_log_and_pause_keys():
    """acquire: KEYS log, pause, on-demand log, waiting, pace; ARGV limit, period us, slot,
    hold us, lane, on-demand cap, grace us, pace ahead. pause: ms."""
    client = RecordingClient()
    limiter = RedisLimiter(client, Rate.parse("240/10s"), prefix="p", batch_share=0.25)
    assert limiter.try_acquire(hold=0.5)[0] == 0.0
    source, keys, args = client.calls[-1]
    assert source == lua("tasks.budget", "acquire")
    assert keys == [
        "p:240/10:log",
        "p:pause",
        "p:240/10:on-demand",
        "p:240/10:waiting",
        "p:240/10:pace",
    ]
    assert args[:2] == [240, 10_000_000] and args[3] == 500_000
    assert args[4:] == ["o", 180, 250_000, PACE_AHEAD]
    limiter.in_lane("batch").try_acquire(slot="s1")
    assert client.calls[-1][2][2] == "s1" and client.calls[-1][2][4] == "b"
    limiter.release(args[2])
    assert client.calls[-1][1:] == (["p:240/10:log"], [args[2]])
    limiter.pause(1.5)
    assert client.calls[-1][1:] == (["p:pause"], [1500])


def test_every_fan_out_script_gets_all_the_runs_keys_then_the_sender():
    """KEYS are the run's ten keys in common.lua's order; ARGV starts with the sender."""
    client = RecordingClient(answer=[])
    run = JitRun(client, "r1")
    run.finish_chunk(Chunk(3, ["a", "b"]), dispatched=2, failed=0, sender="t1")
    source, keys, args = client.calls[-1]
    assert source == lua("tasks.fanout", "common", "finish")
    assert keys == run.keys() and all("{r1}" in k for k in keys)
    assert args == ["t1", 3, 2, 2, 0]
    client.answer = 1
    assert run.claim(Chunk(3, ["a"])) is True
    assert client.calls[-1][2] == ["", 3]


def test_the_nightly_lease_gets_its_key_token_and_milliseconds():
    """lease.lua: KEYS lease; ARGV token, milliseconds."""
    client = RecordingClient(answer=1)
    run = NightlyRun(client, date(2026, 12, 1))
    assert run.lease_for("tok", 2.5) is True
    source, keys, args = client.calls[-1]
    assert source == lua("tasks.nightly", "lease")
    assert keys == [run.lease] and args == ["tok", 2500]
