"""Turns the benchmark's results into ``RESULTS.md`` and ``chart.png``.

Everything written here is computed from ``results.json``: the tables, the
targets and their verdicts, and the figures quoted in the discussion.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import _report_lanes, _report_nightly
from bench._report_cpu import cpu_paragraph, profile_section, worker_cpu_per_batch
from bench._report_nightly import _n, _s, section_rows

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


def rate_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return section_rows(results, "rate")


def grid_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return section_rows(results, "grid")


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
    """A few sentences on the run's own figures; the tables above carry the detail."""
    config = results["config"]
    rows = rate_rows(results)
    largest = max(config["sizes"])
    measured = [r for r in rows if not r["projected"] and r["approach"] != "bound"]
    parts: list[str] = []
    if measured and config["sfox_rule"] != "off":
        total_429 = sum(r["rate_limited"] for r in measured)
        parts.append(
            f"**429s.** {total_429} in {len(measured)} runs. The shared limiter counts a "
            "request's slot from admission until it ends, so no window of arrivals at sFOX "
            f"holds more than the {config['rate']} it allows, however late a sender sends."
        )
    mint = _find(rows, "package: mint tasks", largest)
    bound = _find(rows, "bound", largest)
    plain = _plain_for(rows, largest)
    if mint and bound and plain and config["sfox_rule"] != "off":
        parts.append(
            f"**Held by sFOX's rate.** At {_n(largest)} users the mint tasks reached "
            f"{_pct(bound['wall_s'] / mint['wall_s'])} of the bound's throughput and took "
            f"{mint['wall_s'] / plain['wall_s']:.3f}× the plain loop's time: both wait on the "
            "same window; the rest is sending tasks and reading sealed tokens back."
        )
    cpu = cpu_paragraph(results.get("profile") or {})
    if cpu:
        parts.append(cpu)
    load = results.get("load") or {}
    if load:
        parts.append(
            "**This machine.** Load average (1 min) when each section started: "
            + ", ".join(f"{name} {values[0]:.2f}" for name, values in load.items())
            + ". CPU figures are the least disturbed of several rounds."
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
        _report_lanes.HEADING,
        "",
        _report_lanes.section(results),
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
    text = discussion(results) if rate_rows(results) else ""
    if text:
        lines += ["## Discussion", "", text, ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    """``RESULTS.md``, ``chart.png`` and (if the lanes section ran) ``lanes.png`` in ``out``."""
    chart(results, out / "chart.png")
    _report_lanes.chart(results, out / _report_lanes.CHART_NAME)
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
