"""The benchmark report's CPU section: cost per batch, where it goes, and why."""

from __future__ import annotations

from typing import Any

from bench._profile import GLUE
from bench._report_nightly import _n, section_rows


def worker_cpu_per_batch(results: dict[str, Any]) -> dict[str, Any] | None:
    """The real prefork worker's CPU per batch, from the profile run or the grid."""
    worker = (results.get("profile") or {}).get("worker") or {}
    grid = {
        r["concurrency"]: r["worker_cpu_s"] / r["requests"] * 1000
        for r in section_rows(results, "grid")
        if r["approach"] == "package: mint tasks" and r["latency"] == 0 and r["requests"]
    }
    if "psutil_ms" in worker:
        return {"ms": worker["psutil_ms"], "concurrency": worker["concurrency"], "grid": grid}
    if grid:
        concurrency = min(grid, key=lambda c: grid[c])
        return {"ms": grid[concurrency], "concurrency": concurrency, "grid": grid}
    return None


def profile_section(results: dict[str, Any]) -> str:
    profile = results.get("profile") or {}
    if not profile:
        return "*Not run (`--sections` left out `profile`).*"
    config = results["config"]
    inproc = profile["in_process"]
    m = inproc["measured"]
    worker = profile["worker"]
    real = worker_cpu_per_batch(results)
    out = []
    if real:
        grid = ", ".join(f"{ms:.2f} ms at concurrency {c}" for c, ms in real["grid"].items())
        out.append(
            f"- **Real worker, whole path: {real['ms']:.2f} ms of CPU per batch**: a prefork "
            f"worker × {real['concurrency']} minting {config['profile_users']:,} users in mint "
            f"tasks of {config['grid_chunk']:,}, the stand-in without latency; CPU seconds of "
            "the worker's main and pool processes (psutil) over the requests the stand-in "
            "counted. " + (f"The grid's no-latency runs: {grid}." if grid else "")
        )
    out.append(
        f"- In-process Minter (client + Redis limiter + sealer, no Celery), unprofiled: "
        f"**{m['minter_ms']:.2f} ms per batch**; alone, the sFOX client (request, JSON, entry "
        f"checks) {m['client_ms']:.2f} ms, sealing 100 tokens {m['seal_ms']:.2f} ms, "
        f"a limiter slot (take and release) {m['limiter_ms']:.2f} ms; the rest (retry "
        f"wrapper, bookkeeping) {m['rest_ms']:.2f} ms ({inproc['batches']:,} batches)."
    )
    if worker.get("error"):
        out.append(f"- {worker['error']}")
        return "\n".join(out)
    out.append(
        f"- The same worker run sampled by py-spy ({worker['samples']:,} samples of threads on "
        f"a CPU, main and pool processes): {worker['total_ms']:.2f} ms per batch, of which the "
        f"worker's main process {worker['main_process_ms']:.2f} ms."
    )
    out += [
        "",
        "Where the worker's CPU goes, per batch (py-spy; a sample counts for the deepest "
        "package function on its stack):",
        "",
    ]
    out += _shares("ms per batch", worker["components_ms"], worker["total_ms"], 2)
    out += [
        "",
        "Hot spots: the functions on top of the stack (own time), per batch:",
        "",
        "| function | ms per batch | share |",
        "| --- | ---: | ---: |",
    ]
    for spot in worker["hot_spots"]:
        out.append(f"| `{spot['function']}` | {spot['ms']:.3f} | {spot['share']:.1%} |")
    wut = profile.get("wut")
    if wut and not wut.get("error"):
        out += [
            "",
            f"### `with_user_tokens`: worker CPU per user ({wut['users']:,} users, "
            f"concurrency {wut['concurrency']}, no latency)",
            "",
            f"**{wut['psutil_ms_per_user']:.2f} ms of worker CPU per user**, "
            f"{wut['psutil_ms_per_batch']:.1f} ms per 100-user batch (psutil; "
            f"{_n(wut['users'] / wut['wall_s'])} users/s on this machine). It runs one "
            "`jit_mint_chunk` task per batch and, per user, the downstream task, whose "
            "success the worker marks done in a `task_postrun` handler (one Redis call). "
            f"By py-spy's samples ({wut['samples']:,}):",
            "",
        ]
        out += _shares("ms per user", wut["components_ms"], wut["total_ms"], 3)
        out += [
            "",
            f"Of all samples, {wut['marker_share']:.1%} were under `{wut['marker']}`, "
            "where kombu's Redis transport builds a `redis.Redis` client object for every "
            "message it publishes; `tasks.worker.transport` builds one per connection pool instead "
            "(15% of the samples before it). Hot spots (own time):",
            "",
            "| function | ms per user | share |",
            "| --- | ---: | ---: |",
        ]
        for spot in wut["hot_spots"]:
            out.append(f"| `{spot['function']}` | {spot['ms']:.3f} | {spot['share']:.1%} |")
    return "\n".join(out)


def _shares(unit: str, parts: dict[str, float], total: float, digits: int) -> list[str]:
    """A table of ``parts`` (name: ms), largest first, with each one's share of ``total``."""
    total = total or 1.0
    rows = ["| component | " + unit + " | share |", "| --- | ---: | ---: |"]
    for name, value in sorted(parts.items(), key=lambda kv: -kv[1]):
        rows.append(f"| {name} | {value:.{digits}f} | {value / total:.0%} |")
    return rows


def cpu_paragraph(profile: dict[str, Any]) -> str:
    """Why a batch costs what it does in a worker, from the profile section's figures."""
    worker = profile.get("worker") or {}
    parts = (profile.get("in_process") or {}).get("measured") or {}
    if not worker.get("psutil_ms") or not parts:
        return ""
    glue = (worker.get("components_ms") or {}).get(GLUE, 0.0)
    unsampled = worker["psutil_ms"] - worker.get("total_ms", worker["psutil_ms"])
    return (
        f"**CPU per batch.** A 100-user batch costs {worker['psutil_ms']:.2f} ms of CPU in a "
        f"real worker, against a 2 ms target. {parts['minter_ms']:.2f} ms of it is the "
        f"Minter alone: the HTTP request through `requests`, its JSON and the entry checks "
        f"{parts['client_ms']:.2f} ms, sealing 100 tokens {parts['seal_ms']:.2f} ms, a limiter "
        f"slot {parts['limiter_ms']:.2f} ms. Celery's own handling of the task (receive, "
        f"trace, the result's JSON and its write to Redis, events, the ack) is "
        f"{glue:.2f} ms by py-spy's samples, and {max(unsampled, 0.0):.2f} ms is CPU py-spy "
        "does not see (the kernel's side of sockets and thread wake-ups, psutil counts it). "
        "Sealing is AES-GCM, not Fernet (4.8 µs a token against Fernet's 13–16 µs, timed "
        "side by side on 2026-12-02), and request threads are kept from one task to the "
        "next; what is left is the HTTP "
        "client and Celery, which the package uses rather than replaces. At sFOX's limit a "
        f"worker sends 24 batches a second: {24 * worker['psutil_ms'] / 10:.0f}% of one core."
    )
