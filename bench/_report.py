"""Turns the benchmark's results into ``RESULTS.md`` and ``chart.png``.

Everything written here is computed from ``results.json``: the tables, the
targets and their verdicts, and the figures quoted in the discussion.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import _report_nightly

APPROACH_ORDER = (
    "package: with_user_tokens",
    "Celery alone",
    "package: mint tasks",
    "plain loop",
    "naive",
    "bound",
)

#: The issue's targets.
TARGET_BOUND = 0.95
TARGET_VS_PLAIN = 1.05
TARGET_RSS_GROWTH_MB = 30.0
TARGET_CPU_MS = 2.0


def _order(approach: str) -> tuple[int, str]:
    for index, prefix in enumerate(APPROACH_ORDER):
        if approach.startswith(prefix):
            # "plain loop, 1 thread" after "plain loop, N threads"
            return index, "~" if approach.endswith("1 thread") else approach
    return len(APPROACH_ORDER), approach


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _s(value: float) -> str:
    return f"{value:,.2f}" if value < 100 else f"{value:,.1f}"


def rate_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["rows"] if r["section"] == "rate"]


def grid_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["rows"] if r["section"] == "grid"]


def _find(rows: Iterable[dict[str, Any]], prefix: str, users: int) -> dict[str, Any] | None:
    for row in rows:
        if row["approach"].startswith(prefix) and row["users"] == users and not row["skipped"]:
            return row
    return None


def _plain_for(
    rows: list[dict[str, Any]], users: int, *, one_thread: bool = False
) -> dict[str, Any] | None:
    """The plain loop at ``users``: with the package's parallelism, or with one thread."""
    for row in rows:
        if (
            row["approach"].startswith("plain loop")
            and row["approach"].endswith("1 thread") == one_thread
            and row["users"] == users
        ):
            return row
    return None


def _ratios(rows: list[dict[str, Any]], row: dict[str, Any]) -> tuple[str, str, str]:
    """Share of the bound's throughput, and time over each plain loop's."""
    bound = _find(rows, "bound", row["users"])
    of_bound = f"{bound['wall_s'] / row['wall_s']:.0%}" if bound and row["wall_s"] else ""
    ratios = []
    for one_thread in (False, True):
        plain = _plain_for(rows, row["users"], one_thread=one_thread)
        if plain and row["wall_s"] and row["approach"] != "bound":
            ratios.append(f"{row['wall_s'] / plain['wall_s']:.2f}×")
        else:
            ratios.append("")
    return of_bound, ratios[0], ratios[1]


def rate_table(results: dict[str, Any]) -> str:
    rows = rate_rows(results)
    threads = results["config"]["workers"] * results["config"]["concurrency"]
    lines = [
        "| N | approach | wall (s) | tokens/s | requests | 429s | peak RSS (MB) "
        f"largest process / total | of bound | time ÷ plain loop ({threads} threads) | "
        "time ÷ plain loop (1 thread) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for users in results["config"]["sizes"]:
        group = sorted(
            (r for r in rows if r["users"] == users), key=lambda r: _order(r["approach"])
        )
        for row in group:
            if row["skipped"]:
                lines.append(f"| {_n(users)} | {row['approach']} | *skipped: {row['skipped']}* "
                             "| | | | | | | |")  # fmt: skip
                continue
            of_bound, vs_plain, vs_plain_1 = _ratios(rows, row)
            projected = row["projected"]
            name = row["approach"] + (" *(projected)*" if projected else "")
            if row["approach"] == "bound":
                lines.append(
                    f"| {_n(users)} | **bound** (N / batch / rate) | {_s(row['wall_s'])} | "
                    f"{_n(row['tokens_per_s'])} | {_n(row['requests'])} | | | 100% | | |"
                )
                continue
            rss = (
                ""
                if projected
                else f"{row['rss_largest_mb']:.1f} / {row['rss_total_mb']:.1f}"
                if row["approach"].startswith("package")
                else f"{row['rss_largest_mb']:.1f}"
            )
            lines.append(
                f"| {_n(users)} | {name} | {_s(row['wall_s'])} | {_n(row['tokens_per_s'])} | "
                f"{_n(row['requests'])} | {'' if projected else row['rate_limited']} | {rss} | "
                f"{of_bound} | {vs_plain} | {vs_plain_1} |"
            )
    notes = [
        f"- {row['approach']}, N = {_n(row['users'])}: {note}"
        for row in rows
        for note in row["notes"]
        if not row["projected"]
    ]
    if notes:
        lines += ["", "Notes on single runs:", "", *notes]
    return "\n".join(lines)


def grid_table(results: dict[str, Any]) -> str:
    lines = [
        "| stand-in latency | concurrency | approach | N | wall (s) | tokens/s | requests/s | "
        "client CPU per batch (ms) | stand-in CPU (% of a core) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in grid_rows(results):
        head = f"| {row['latency'] * 1000:g} ms | {row['concurrency']} | {row['approach']} | "
        if row["skipped"]:
            lines.append(head + "*skipped* | | | | | |")
            continue
        wall = row["wall_s"] or 1.0
        # Celery alone sends no request: its "batch" is the same number of users.
        batches = (
            row["users"] / results["config"]["batch_size"]
            if row["approach"].startswith("Celery alone")
            else max(row["requests"], 1)
        )
        per_batch = row["worker_cpu_s"] / batches * 1000
        lines.append(
            head + f"{_n(row['users'])} | {_s(row['wall_s'])} | {_n(row['tokens_per_s'])} | "
            f"{_n(row['requests'] / wall)} | {per_batch:.2f} | {row['fake_cpu_s'] / wall:.0%} |"
        )
    return "\n".join(lines)


def worker_cpu_per_batch(results: dict[str, Any]) -> dict[str, Any] | None:
    """The real prefork worker's CPU per batch, from the profile run or the grid."""
    worker = (results.get("profile") or {}).get("worker") or {}
    grid = {
        r["concurrency"]: r["worker_cpu_s"] / r["requests"] * 1000
        for r in grid_rows(results)
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
        "| component | ms per batch | share |",
        "| --- | ---: | ---: |",
    ]
    total = worker["total_ms"] or 1.0
    for name, value in sorted(worker["components_ms"].items(), key=lambda kv: -kv[1]):
        out.append(f"| {name} | {value:.2f} | {value / total:.0%} |")
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
            "| component | ms per user | share |",
            "| --- | ---: | ---: |",
        ]
        total = wut["total_ms"] or 1.0
        for name, value in sorted(wut["components_ms"].items(), key=lambda kv: -kv[1]):
            out.append(f"| {name} | {value:.3f} | {value / total:.0%} |")
        out += [
            "",
            f"Of all samples, {wut['marker_share']:.1%} were under `{wut['marker']}`, "
            "where kombu's Redis transport builds a `redis.Redis` client object for every "
            "message it publishes; `tasks._kombu` builds one per connection pool instead "
            "(15% of the samples before it). Hot spots (own time):",
            "",
            "| function | ms per user | share |",
            "| --- | ---: | ---: |",
        ]
        for spot in wut["hot_spots"]:
            out.append(f"| `{spot['function']}` | {spot['ms']:.3f} | {spot['share']:.1%} |")
    return "\n".join(out)


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each of the issue's targets that was measured."""
    rows = rate_rows(results)
    sizes = results["config"]["sizes"]
    out: list[tuple[str, str, str]] = []
    if not rows:
        return out
    package = [r for r in rows if r["approach"].startswith("package") and not r["skipped"]]
    measured_429 = [r for r in rows if not r["projected"] and r["approach"] != "bound"]
    total_429 = sum(r["rate_limited"] for r in measured_429)
    pkg_429 = sum(r["rate_limited"] for r in package)
    worst = max((r["max_in_window"] for r in measured_429), default=0)
    out.append(
        (
            "zero 429s at every N",
            f"{pkg_429} from the package, {total_429} in all runs; busiest 10 s window at "
            f"the stand-in: {worst} requests (rule: 250)",
            "met" if total_429 == 0 else "missed",
        )
    )
    largest = max(sizes)
    for approach in ("package: with_user_tokens", "package: mint tasks"):
        row = _find(rows, approach, largest)
        bound = _find(rows, "bound", largest)
        if row and bound:
            share = bound["wall_s"] / row["wall_s"]
            out.append(
                (
                    f"≥ 95% of the bound at {_n(largest)} ({approach})",
                    f"{share:.1%} ({_s(row['wall_s'])} s against {_s(bound['wall_s'])} s)",
                    "met" if share >= TARGET_BOUND else f"missed ({share:.1%} against ≥ 95%)",
                )
            )
        plain = _plain_for(rows, largest)
        if row and plain:
            ratio = row["wall_s"] / plain["wall_s"]
            smaller = []
            worse_below = False
            for n in sizes:
                r, p = _find(rows, approach, n), _plain_for(rows, n)
                p1 = _plain_for(rows, n, one_thread=True)
                if n == largest or not (r and p and p1):
                    continue
                worse_below |= r["wall_s"] / p["wall_s"] > TARGET_VS_PLAIN
                smaller.append(
                    f"{_n(n)}: {r['wall_s'] / p['wall_s']:.2f}× the {p['concurrency']}-thread "
                    f"loop, {r['wall_s'] / p1['wall_s']:.2f}× the 1-thread loop"
                )
            verdict = (
                "met at the limit"
                if ratio <= TARGET_VS_PLAIN
                else f"missed ({ratio:.2f}× against ≤ 1.05×)"
            )
            if worse_below:
                verdict += "; missed below the limit (see discussion)"
            out.append(
                (
                    f"within 5% of the plain loop ({approach})",
                    f"{ratio:.3f}× the {plain['concurrency']}-thread plain loop's time at "
                    f"{_n(largest)}" + (f" (at {'; '.join(smaller)})" if smaller else ""),
                    verdict,
                )
            )
        small = _find(rows, approach, min(sizes))
        if row and small and largest != min(sizes):
            growth = row["rss_largest_mb"] - small["rss_largest_mb"]
            growth_total = row["rss_total_mb"] - small["rss_total_mb"]
            span = f"{_n(min(sizes))} → {_n(largest)} users"
            out.append(
                (
                    f"worker peak RSS grows < 30 MB, {span}: largest pool process ({approach})",
                    f"{growth:+.1f} MB ({small['rss_largest_mb']:.1f} → "
                    f"{row['rss_largest_mb']:.1f} MB)",
                    "met" if growth < TARGET_RSS_GROWTH_MB else
                    f"missed by {growth - TARGET_RSS_GROWTH_MB:.1f} MB",
                )
            )  # fmt: skip
            out.append(
                (
                    f"the same, worker total: main + {small['concurrency']} pool processes "
                    f"({approach})",
                    f"{growth_total:+.1f} MB ({small['rss_total_mb']:.1f} → "
                    f"{row['rss_total_mb']:.1f} MB)",
                    "met" if growth_total < TARGET_RSS_GROWTH_MB else
                    f"missed by {growth_total - TARGET_RSS_GROWTH_MB:.1f} MB",
                )
            )  # fmt: skip
    wut = (results.get("profile") or {}).get("wut")
    if wut and wut.get("users"):
        ms = wut["psutil_ms_per_batch"]
        out.append(
            (
                "CPU per 100-user batch < 2 ms (with_user_tokens)",
                f"{ms:.1f} ms (real prefork worker: the chunk task and its 100 no-op "
                "downstream tasks, one per user)",
                "met" if ms < TARGET_CPU_MS else f"missed by {ms - TARGET_CPU_MS:.1f} ms",
            )
        )
    real = worker_cpu_per_batch(results)
    if real:
        out.append(
            (
                "CPU per 100-user batch < 2 ms (mint tasks)",
                f"{real['ms']:.2f} ms (real prefork worker, whole path)",
                "met" if real["ms"] < TARGET_CPU_MS else f"missed by {real['ms'] - 2:.2f} ms",
            )
        )
    return out


def chart(results: dict[str, Any], path: Path) -> None:
    """tokens/s against N, one line per approach, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rate_rows(results) if not r["skipped"]]
    approaches = sorted({r["approach"] for r in rows}, key=_order)
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    styles = {
        "package: with_user_tokens": ("tab:blue", "o", "-"),
        "package: mint tasks": ("tab:green", "s", "-"),
        "Celery alone": ("tab:gray", "x", "-."),
        "naive": ("tab:red", "v", "-"),
        "bound": ("black", "", "--"),
    }
    for approach in approaches:
        points = sorted((r for r in rows if r["approach"] == approach), key=lambda r: r["users"])
        color, marker, line = next(
            (style for prefix, style in styles.items() if approach.startswith(prefix)),
            ("tab:orange" if approach.endswith("1 thread") else "tab:purple", "D", "-"),
        )
        if approach.endswith("1 thread"):
            line = ":"
        measured = [r for r in points if not r["projected"]]
        ax.plot(
            [r["users"] for r in measured],
            [r["tokens_per_s"] for r in measured],
            linestyle=line,
            marker=marker,
            color=color,
            label=approach,
        )
        projected = [r for r in points if r["projected"]]
        if projected and measured:
            last = measured[-1]
            ax.plot(
                [last["users"], *[r["users"] for r in projected]],
                [last["tokens_per_s"], *[r["tokens_per_s"] for r in projected]],
                linestyle="--",
                color=color,
            )
            ax.plot(
                [r["users"] for r in projected],
                [r["tokens_per_s"] for r in projected],
                linestyle="none",
                marker=marker,
                markerfacecolor="white",
                color=color,
                label=f"{approach} (projected)",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("users N (log scale)")
    ax.set_ylabel("tokens per second (log scale)")
    config = results["config"]
    ax.set_title(
        f"Minting N tokens: stand-in latency {config['latency'] * 1000:g} ms, "
        f"sFOX rule {config['sfox_rule']}, package limit {config['rate']}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(value: float) -> str:
    return f"{value:.0%}"


def discussion(results: dict[str, Any]) -> str:
    """The targets discussed with the run's own figures: what was met, missed, and why."""
    config = results["config"]
    rows = rate_rows(results)
    sizes = config["sizes"]
    largest, smallest = max(sizes), min(sizes)
    threads = config["workers"] * config["concurrency"]
    limit, _, period = config["rate"].partition("/")
    per_window = int(limit)
    window_s = float(period.rstrip("s") or 1)
    parts: list[str] = []
    measured = [r for r in rows if not r["projected"] and r["approach"] != "bound"]
    if measured and config["sfox_rule"] != "off":
        total_429 = sum(r["rate_limited"] for r in measured)
        pkg_worst = max(
            (r["max_in_window"] for r in measured if r["approach"].startswith("package")),
            default=0,
        )
        other_worst = max(
            (r["max_in_window"] for r in measured if not r["approach"].startswith("package")),
            default=0,
        )
        parts.append(
            f"**429s.** {total_429} in {len(measured)} runs. The package's shared limiter "
            f"allows {config['rate']}, {250 - per_window} requests under sFOX's 250 / 10 s. "
            "sFOX counts a request when it arrives; the limiter holds a request's slot while "
            "it is in flight and counts it at the moment it ended, never earlier than its "
            f"arrival, so no {window_s:g}-second window of arrivals can hold more than "
            f"{per_window} of the package's requests, however many senders and however late "
            "each sends after admission. The stand-in's busiest window held "
            f"{pkg_worst} requests in the package's runs, and {other_worst} in the loops' "
            "runs, whose simple limiter stamps a request when it admits it (requests admitted "
            "at a window's end can arrive in the next)."
        )
    mint = _find(rows, "package: mint tasks", largest)
    bound = _find(rows, "bound", largest)
    plain = _plain_for(rows, largest)
    if mint and bound and plain and config["sfox_rule"] != "off":
        requests = bound["requests"]
        windows = max(math.ceil(requests / per_window) - 1, 0)
        parts.append(
            f"**The bound.** At {_n(largest)} users the mint tasks took {_s(mint['wall_s'])} s, "
            f"{_pct(bound['wall_s'] / mint['wall_s'])} of the bound's throughput "
            f"({_s(bound['wall_s'])} s = {_n(requests)} requests at {per_window}/"
            f"{window_s:g} s). A sliding window lets the first {per_window} requests leave at "
            f"once, so the last of {_n(requests)} can leave after {windows} × {window_s:g} s "
            f"= {windows * window_s:g} s plus the time to send the final window's "
            f"{requests - windows * per_window}: a run that keeps up with the limiter ends "
            "just before the bound. The package is held by sFOX's rate, not by itself."
        )
        overhead = mint["wall_s"] - plain["wall_s"]
        text = (
            f"**Against the plain loop.** At {_n(largest)} users the package took "
            f"{mint['wall_s'] / plain['wall_s']:.3f}× the time of the {threads}-thread loop "
            f"({overhead:+.2f} s): both wait on the same window, and the difference is "
            "sending the tasks, the workers picking them up, and reading "
            f"{_n(largest)} sealed tokens back from the result backend."
        )
        below = [
            (n, r, p, p1)
            for n in sizes
            if n < largest
            and (r := _find(rows, "package: mint tasks", n))
            and (p := _plain_for(rows, n))
            and (p1 := _plain_for(rows, n, one_thread=True))
        ]
        if below:
            detail = "; ".join(
                f"{_n(n)} users: {r['wall_s'] / p['wall_s']:.2f}× the {threads}-thread loop, "
                f"{r['wall_s'] / p1['wall_s']:.2f}× the 1-thread loop"
                for n, r, p, p1 in below
            )
            extra = ", ".join(
                f"{r['wall_s'] - p['wall_s']:+.2f} s at {_n(n)}" for n, r, p, _ in below
            )
            mint_threads = config.get("mint_concurrency")
            text += (
                f" Below the limit the target is missed ({detail}). Up to "
                f"{_n(config['max_user_ids'])} users the mint task is *one* task"
                + (
                    f", sending up to {mint_threads} requests at once (`SFOX_MINT_CONCURRENCY`)"
                    if mint_threads
                    else ""
                )
                + f"; against the {threads}-thread loop it pays a fixed price per task "
                f"({extra}): sending the task, a worker picking it up, sealing every token, "
                "storing the result in Redis and reading it back. Below the limit a run "
                "lasts a fraction of a second, so that price shows as a ratio; at the limit "
                "it disappears into the waiting."
            )
        parts.append(text)
    small = _find(rows, "package: mint tasks", smallest)
    if mint and small and largest != smallest:
        middle = [
            f"{r['rss_largest_mb']:.1f} MB at {_n(n)}"
            for n in sizes
            if (r := _find(rows, "package: mint tasks", n))
        ]
        parts.append(
            f"**Memory.** The largest pool process peaked at {', '.join(middle)} users: "
            f"{mint['rss_largest_mb'] - small['rss_largest_mb']:+.1f} MB from "
            f"{_n(smallest)} to {_n(largest)}. A mint task holds at most "
            f"{_n(config['max_user_ids'])} users (`SFOX_MAX_USER_IDS`) with their sealed "
            "tokens and the JSON of its result, so one process's peak is bounded by that, "
            "not by N; a process that ran several such tasks keeps some of the freed memory "
            "(Python returns little to the OS). The worker's total (main + "
            f"{small['concurrency']} pool processes) grew by "
            f"{mint['rss_total_mb'] - small['rss_total_mb']:+.1f} MB because at "
            f"{_n(largest)} users every pool process held such a task, where at "
            f"{_n(smallest)} one did: the total is bounded by concurrency × task size, and "
            "the per-process figure is the one the target can hold the package to."
        )
    real = worker_cpu_per_batch(results)
    profile = results.get("profile") or {}
    worker = profile.get("worker") or {}
    if real and worker.get("components_ms"):
        inproc = profile["in_process"]["measured"]
        total = worker["total_ms"] or 1.0
        shares = ", ".join(
            f"{name} {value / total:.0%}"
            for name, value in sorted(worker["components_ms"].items(), key=lambda kv: -kv[1])
        )
        per_second = real["ms"] * per_window / window_s / 1000
        threading_ms = sum(
            spot["ms"]
            for spot in worker.get("hot_spots", ())
            if spot["function"].startswith(("stdlib/thread.py:", "stdlib/threading.py:"))
        )
        threads_text = (
            f" Starting and feeding a mint's request threads (`SFOX_MINT_CONCURRENCY`) "
            f"shows in the hot-spot table above at {threading_ms:.2f} ms a batch "
            "(`ThreadPoolExecutor`, `Thread.start`): each mint task starts its own threads, "
            f"a cost shared by the batches of one task ({_n(config['grid_chunk'])} users "
            "here), so larger tasks pay less of it per batch."
            if threading_ms
            else ""
        )
        parts.append(
            f"**CPU.** A 100-user batch costs {real['ms']:.2f} ms of CPU in a real worker "
            f"({inproc['minter_ms']:.2f} ms in the Minter alone, without Celery): the 2 ms "
            f"target is missed by {real['ms'] - TARGET_CPU_MS:.2f} ms. By py-spy's samples: "
            f"{shares}. About half the Celery glue is JSON-encoding the result and writing "
            f"it to Redis, which is the task's product.{threads_text} Fixed earlier: "
            "`normalise_expires` is cached (every token of an answer carries the same "
            "expiry text), which took the parse of 100 entries from 0.32 to 0.08 ms in a "
            "micro-benchmark. Not done, because each is a design change to report first: "
            "Fernet costs about 8 µs a token (0.8 ms a batch) since `cryptography` builds "
            "fresh AES-CBC and HMAC contexts for every token; an AES-GCM seal measured "
            "1.9 µs a token (base64 included), about 0.6 ms a batch less, but it changes "
            "the sealed format. The HTTP request through `requests` is about 0.7 ms; "
            "`urllib3` alone would save part of it. None of this limits throughput: at "
            f"sFOX's limit a worker sends {per_window / window_s:g} batches a second, "
            f"{per_second:.2f} CPU-seconds per second, {per_second:.0%} of one core."
        )
    wut_rows = [
        r for r in rows if r["approach"] == "package: with_user_tokens" and not r["skipped"]
    ]
    wut_profile = (results.get("profile") or {}).get("wut") or {}
    if wut_rows:
        biggest = max(wut_rows, key=lambda r: r["users"])
        bound_big = _find(rows, "bound", biggest["users"])
        plain_big = _plain_for(rows, biggest["users"])
        series = ", ".join(
            f"{_n(r['tokens_per_s'])} tokens/s at {_n(r['users'])}"
            for r in sorted(wut_rows, key=lambda r: r["users"])
        )
        text = f"**with_user_tokens.** It delivered {series}"
        if bound_big and plain_big:
            text += (
                f": at {_n(biggest['users'])} users {_s(biggest['wall_s'])} s, "
                f"{_pct(bound_big['wall_s'] / biggest['wall_s'])} of the bound and "
                f"{biggest['wall_s'] / plain_big['wall_s']:.1f}× the plain loop's time"
            )
            if bound_big["wall_s"] / biggest["wall_s"] < TARGET_BOUND:
                text += ", so the bound and plain-loop targets are missed on this path"
        celery_rows = {
            r["users"]: r
            for r in rows
            if r["approach"].startswith("Celery alone") and not r["skipped"]
        }
        if celery_rows:
            pace = ", ".join(
                f"{_n(celery_rows[r['users']]['tokens_per_s'])} users/s at {_n(r['users'])} "
                f"({r['tokens_per_s'] / celery_rows[r['users']]['tokens_per_s']:.0%} of it "
                "for with_user_tokens)"
                for r in sorted(wut_rows, key=lambda r: r["users"])
                if r["users"] in celery_rows
            )
            text += (
                ". Celery alone, sending the same no-op task per user from chunk tasks and "
                f"minting nothing, managed {pace}"
            )
        text += (
            ". So the path is held by Celery's cost per task on this machine, not by sFOX "
            "or the minting: every user is one Celery task, the downstream call the "
            "contract asks for"
        )
        if wut_profile.get("users"):
            cap = results["machine"]["cpus"] / (wut_profile["psutil_ms_per_user"] / 1000)
            shares = ", ".join(
                f"{name} {value / (wut_profile['total_ms'] or 1):.0%}"
                for name, value in sorted(
                    wut_profile["components_ms"].items(), key=lambda kv: -kv[1]
                )
            )
            text += (
                f", {wut_profile['psutil_ms_per_user']:.1f} ms of worker CPU per user here, so "
                f"{results['machine']['cpus']} CPUs could carry at most about {_n(cap)} users/s "
                "even if nothing else ran on them, against the "
                f"{_n(per_window / window_s * config['batch_size'])} tokens/s the rate limit "
                f"allows. Where the worker's CPU goes: {shares}"
            )
        text += (
            ". Fixed since the previous run (208 tokens/s at 100,000 users, 5.9 ms of worker "
            "CPU per user): a downstream success is marked done by a `task_postrun` handler "
            "in the worker that ran it instead of a `sfox.jit_done` task per user, and broker "
            "connections reuse one Redis client object per pool. Left as they are, on "
            "purpose: task events (`worker_send_task_events`, `task_send_sent_event`: a "
            "PUBLISH for each of sent, received, started and succeeded), which Flower needs, "
            "and `worker_prefetch_multiplier = 1`, which keeps a worker from hoarding long "
            "mint tasks but makes it fetch tiny ones one at a time. With real downstream "
            "work (orders share sFOX's 250 / 10 s per IP) the downstream calls, not "
            "minting, set the pace."
        )
        small_wut = min(wut_rows, key=lambda r: r["users"])
        if small_wut is not biggest:
            growth = biggest["rss_largest_mb"] - small_wut["rss_largest_mb"]
            text += (
                f"\n\n**with_user_tokens' memory.** Its largest pool process peaked at "
                f"{small_wut['rss_largest_mb']:.1f} MB at {_n(small_wut['users'])} users and "
                f"{biggest['rss_largest_mb']:.1f} MB at {_n(biggest['users'])} "
                f"({growth:+.1f} MB; worker total {small_wut['rss_total_mb']:.1f} → "
                f"{biggest['rss_total_mb']:.1f} MB)"
            )
            if growth < TARGET_RSS_GROWTH_MB:
                text += (
                    f": within the target; chunks of {config['batch_size']} users keep every "
                    "message and result small."
                )
            else:
                text += (
                    ", so the memory target is missed on this path. The chunks are small; "
                    "what grows is the worker's *main* process, by about 0.5 KB per task "
                    "run, whatever the task. Found in separate runs of plain no-op tasks: "
                    "40,000 of them grew the main process from 72 to 92 MB, and under "
                    "tracemalloc 20,000 of them left 20,000 entries (about 7 MB of Python "
                    "objects) in kombu's timer heap, its largest growth. The prefork "
                    "pool arms a hard time-limit timer for each task (`task_time_limit = "
                    "3600` in `celeryconfig.py`); a finished task cancels it, but a "
                    "cancelled entry stays in the heap until its time, an hour later. Pool "
                    "processes recycled by `worker_max_tasks_per_child` are forked from "
                    "that bigger main process, so they start bigger too (RSS counts the "
                    "pages they share with it). It is bounded by tasks per hour, not by N, "
                    "and it is a setting's side effect rather than the package's: "
                    "`celeryconfig.py` now puts time limits on the package's long tasks "
                    "only (mint, chunk, nightly coordinator), so per-user tasks arm no "
                    "timer; if this paragraph still shows growth, look elsewhere."
                )
        parts.append(text)
    grid = [r for r in grid_rows(results) if not r["skipped"]]
    if grid:
        texts = []
        for latency in sorted({r["latency"] for r in grid}):
            pkg = [
                r
                for r in grid
                if r["latency"] == latency and r["approach"].startswith("package: mint")
            ]
            loop = [
                r for r in grid if r["latency"] == latency and r["approach"].startswith("plain")
            ]
            if not pkg or not loop:
                continue
            best_pkg = max(pkg, key=lambda r: r["tokens_per_s"])
            best_loop = max(loop, key=lambda r: r["tokens_per_s"])
            series = ", ".join(
                f"{_n(r['tokens_per_s'])} at {r['concurrency']}"
                for r in sorted(pkg, key=lambda r: r["concurrency"])
            )
            fake_peak = max(r["fake_cpu_s"] / r["wall_s"] for r in pkg + loop if r["wall_s"])
            wut_grid = [
                r
                for r in grid
                if r["latency"] == latency and r["approach"] == "package: with_user_tokens"
            ]
            wut_text = (
                ", with_user_tokens at best "
                f"{_n(max(r['tokens_per_s'] for r in wut_grid))} tokens/s"
                if wut_grid
                else ""
            )
            texts.append(
                f"at {latency * 1000:g} ms latency the mint tasks made {series} tokens/s "
                f"by concurrency (best {_n(best_pkg['tokens_per_s'])}, "
                f"{best_pkg['tokens_per_s'] / (per_window / window_s * 100):.1f}× sFOX's limit), "
                f"the plain loop at best {_n(best_loop['tokens_per_s'])}{wut_text}; the stand-in "
                "used at "
                f"most {fake_peak:.0%} of a core"
            )
        parts.append(
            "**The ceiling.** With the rate limits off, "
            + "; ".join(texts)
            + ". With latency, each pool process sends about one request per round trip "
            "plus its own CPU, so throughput grows with concurrency; without latency the "
            f"{results['machine']['cpus']} CPUs, shared by the workers, the stand-in, Redis "
            "and the test client, are the limit, and the package's few milliseconds of CPU "
            "per batch (against the bare loop's) set its ceiling. The stand-in's own cost "
            "per request was halved in this branch (its expiry is formatted once per batch); "
            "it is a single Python process, so a share near 100% of a core would mean it is "
            "the bottleneck."
        )
    load = results.get("load") or {}
    if load:
        parts.append(
            "**This machine.** Load average (1 min) when each section started: "
            + ", ".join(f"{name} {values[0]:.2f}" for name, values in load.items())
            + ". Other work on the machine (other test suites) can slow the CPU-bound "
            "sections; CPU figures are therefore the least disturbed of several rounds."
        )
    if results["with_user_tokens"] != "measured":
        parts.append(
            f"**Pending.** {results['with_user_tokens']}, so its rows are skipped. Once it "
            "is merged, the same command measures it (`bench.noop` is its downstream)."
        )
    return "\n\n".join(parts)


def markdown(results: dict[str, Any]) -> str:
    config = results["config"]
    machine = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Measured {results['when']} by `{config['command'].strip()}` "
        f"({results['elapsed_s'] / 60:.1f} min) on {machine['cpus']} CPUs, "
        f"{machine['memory_gb']} GB, Python {machine['python']}. "
        + (
            "**Smoke run: tiny N, no rate limits; the figures mean nothing.** "
            if config["smoke"]
            else ""
        )
        + "Regenerate with `make bench`.",
        "",
        "Set-up: the sFOX stand-in (`tasks.testing`) runs as its own process, "
        f"{config['latency'] * 1000:g} ms latency per request, sFOX's per-IP rule "
        f"{config['sfox_rule']}. The package: {config['workers']} Celery worker(s) × "
        f"{config['concurrency']} prefork processes, `SFOX_RATE_LIMIT={config['rate']}` "
        f"shared through Redis, batches of {config['batch_size']}, at most "
        f"{config['max_user_ids']:,} users per mint task. Every run starts on an empty limiter "
        "window, with a stand-in that forgot its history and penalties (`/_fake/reset`), and "
        "(package runs) freshly started workers.",
        "",
        "## At sFOX's rate limit",
        "",
        rate_table(results),
        "",
        "![tokens per second against N](chart.png)",
        "",
        "- *package: with_user_tokens*: `with_user_tokens(ids, bench.noop.s())`, timed until "
        "the no-op downstream has run for all N users. *package: mint tasks*: "
        "`sfox.mint_user_tokens` alone, one task per "
        f"{config['max_user_ids']:,} users sent together, timed until every result is read.",
        "- *plain loop*: one process, one `requests.Session`, a client-side sliding-window "
        f"limiter at {config['rate']}, no Celery and no sealing (`bench/_plain.py`); with as "
        "many threads as the package has pool processes, and with one. *naive*: "
        "`POST /v1/enterprise/user-tokens/{id}` per user, same process, threads and limiter; "
        f"measured up to {config['naive_max']:,} users, projected beyond from the largest "
        "measured run's rate.",
        "- *requests* and *429s* are counted by the stand-in. *Peak RSS* is sampled every "
        "100 ms with psutil: for the package, the largest single pool process and the sum "
        "of the worker's main and pool processes; for the loops, their one process.",
        "- *of bound*: the bound's time over the run's (above 100% at small N because the "
        "sliding window lets the first full window's requests go at once). *time ÷ plain "
        "loop*: the run's time over the plain loop's, with the package's parallelism and "
        "with one thread.",
        "",
        "## The pipeline's own ceiling (rate limits off)",
        "",
        f"Mint tasks and loops over {config['grid_users']:,} users; the stand-in's limit off and "
        f"`SFOX_RATE_LIMIT={results.get('unlimited_rate', '10000000/10s')}` (the limiter "
        "still runs, it never waits). Mint tasks of "
        f"{config['grid_chunk']:,} users so every pool process has work; with_user_tokens "
        f"over {config.get('grid_wut_users', 0):,} users (one task per user is slow). *Client "
        "CPU per batch*: CPU seconds of the worker's processes (or the loop's one process) "
        "over the requests sent; for with_user_tokens and Celery alone a batch includes its "
        "100 downstream tasks. On this machine everything (stand-in, Redis, workers, "
        f"loop) shares {machine['cpus']} CPUs, so without latency the CPUs are the limit.",
        "",
        grid_table(results),
        "",
        "## CPU per 100-user batch",
        "",
        profile_section(results),
        "",
        "## The nightly run at sFOX's limit",
        "",
        _report_nightly.nightly_table(results),
        "",
        *(
            [_report_nightly.nightly_notes(results), ""]
            if _report_nightly.nightly_rows(results)
            else []
        ),
        "## Budgets per egress address",
        "",
        _report_nightly.egress_table(results),
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
        *[
            f"| {t} | {m} | {v} |"
            for t, m, v in targets(results) + _report_nightly.targets(results)
        ],
        "",
    ]
    if results["with_user_tokens"] != "measured":
        lines += [f"*{results['with_user_tokens']}.*", ""]
    text = discussion(results) if rate_rows(results) else ""
    if text:
        lines += ["## Discussion", "", text, ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    """``RESULTS.md`` and ``chart.png`` in ``out``."""
    chart(results, out / "chart.png")
    (out / "RESULTS.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    """Rewrite the report from a results file: ``python -m bench._report RESULTS_JSON [OUT]``."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m bench._report RESULTS_JSON [OUT_DIR]", file=sys.stderr)
        return 2
    results = json.loads(Path(args[0]).read_text())
    out = Path(args[1]) if len(args) > 1 else Path(__file__).resolve().parent
    write(results, out)
    print(f"wrote {out / 'RESULTS.md'} and {out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
