"""The report's lanes section and ``lanes.png``, from ``results.json``'s ``lanes``."""

# The report prints the multiplication and minus signs, as the other report modules do.
# ruff: noqa: RUF001

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench._plain import nightly_requests, window_minimum_s
from bench._report_nightly import _n, _s

#: Where the lanes chart goes, beside ``chart.png``.
CHART_NAME = "lanes.png"
#: The lanes section's heading in RESULTS.md, and the one it comes before.
HEADING = "## On-demand mints beside the nightly run (lanes)"
BEFORE = "## Targets"


def _runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return list((results.get("lanes") or {}).get("runs") or [])


def _sec(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> str:
    """Seconds to the millisecond."""
    return "" if value is None else f"{value:.3f}"


def _run(runs: list[dict[str, Any]], name: str, users: int | None = None) -> dict[str, Any] | None:
    return next(
        (r for r in runs if r["name"] == name and (users is None or r["users"] == users)), None
    )


def latency_table(results: dict[str, Any]) -> str:
    """On-demand latency: idle, during each night, and the burst, against the bound."""
    lanes = results["lanes"]
    runs = _runs(results)
    bound = lanes["latency_bound_s"]
    lines = [
        "| on-demand mints | beside | mints | p50 (s) | p95 (s) | max (s) | p50 ÷ bound | failed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        for key, what in (("stream", f"one every {_g(run.get('every_s'))} s"), ("burst", "")):
            part = run.get(key)
            if not part or not part["count"]:
                continue
            if key == "burst":
                what = f"{part['count']} at once, half-way through the night"
            beside = "no night" if not run["users"] else f"a night of {_n(run['users'])} users"
            ratio = f"{part['p50'] / bound:.1f}×" if part["p50"] is not None and bound else ""
            lines.append(
                f"| {what} | {beside} | {part['count']} | {_ms(part['p50'])} | "
                f"{_ms(part['p95'])} | {_ms(part['max'])} | {ratio} | {part['failed']} |"
            )
    return "\n".join(lines)


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else "?"


def night_table(results: dict[str, Any]) -> str:
    """The night's time alone and beside on-demand mints, against its bound."""
    lanes = results["lanes"]
    config = results["config"]
    slot = lanes["slot_s"]
    runs = [r for r in _runs(results) if r["users"]]
    lines = [
        "| N | on-demand mints beside it | night (s) | bound (s) | of bound | sliding-window "
        "minimum (s) | of it | on-demand requests | their share (s) | of bound + their share | "
        "night − alone (s) | 429s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        night = run["night"]
        alone = _run(runs, "alone", run["users"])
        count = int(run.get("on_demand_requests") or 0)
        share = count * slot
        wall, bound = night["wall_s"], night["bound_s"]
        beside = {
            "alone": "none",
            "stream": f"one every {_g(run.get('every_s'))} s",
            "burst": f"{(run.get('burst') or {}).get('count', 0)} at once, half-way",
        }.get(run["name"], run["name"])
        extra = (
            f"{wall - alone['night']['wall_s']:+.1f}" if alone and alone is not run and wall else ""
        )
        least = window_minimum_s(
            nightly_requests(run["users"], config["batch_size"]), config["rate"]
        )
        lines.append(
            f"| {_n(run['users'])} | {beside} | {_s(wall)} | {_s(bound)} | "
            f"{bound / wall:.0%} | {_s(least)} | {least / wall:.0%} | {count} | {share:.2f} | "
            f"{(bound + share) / wall:.0%} | {extra} | {night['rate_limited']} |"
            if wall
            else f"| {_n(run['users'])} | {beside} | | {_s(bound)} | | {_s(least)} | | {count} "
            "| | | | |"
        )
    notes = [
        f"- {run['name']}, N = {_n(run['users'])}: {note}"
        for run in _runs(results)
        for note in run["night"]["notes"]
    ]
    if notes:
        lines += ["", "Notes on single runs:", "", *notes]
    return "\n".join(lines)


def overhead(results: dict[str, Any]) -> str:
    """Where the night alone spent the time it did not spend waiting on the window."""
    run = _run(_runs(results), "alone")
    if not run or "times" not in run:
        return ""
    t = run["times"]

    def gap(later: str, earlier: str) -> str:
        a, b = t.get(later), t.get(earlier)
        return f"{a - b:.2f} s" if a is not None and b is not None else "?"

    return (
        f"The night of {_n(run['users'])} alone: its coordinator began "
        f"{_sec(t.get('coordinator_started_s'))} s after the task was sent (the run's books), "
        f"its first request reached "
        f"the stand-in {_sec(t['first_request_s'])} s after the send; its last order "
        f"arrived at {_sec(t['last_order_s'])} s; the worker stored the summary "
        f"{gap('summary_stored_s', 'last_order_s')} after that order's arrival (the stand-in's "
        f"latency included), and the sender saw it {gap('summary_seen_s', 'summary_stored_s')} "
        "later (it looks every 50 ms)."
    )


def section(results: dict[str, Any], *, apart: bool = False) -> str:
    """The report's lanes section, in Markdown; ``apart``: measured apart from the report."""
    lanes = results.get("lanes") or {}
    if not lanes:
        return "*Not run (`--sections` left out `lanes`).*"
    config = results["config"]
    load = (results.get("load") or {}).get("lanes")
    when = (
        [
            f"Measured {results['when']} by `{config['command'].strip()}` "
            f"({results['elapsed_s'] / 60:.1f} min) on {results['machine']['cpus']} CPUs, "
            "apart from the rest of this report"
            + (f" (load average at its start: {load[0]:.2f})" if load else "")
            + ".",
            "",
        ]
        if apart
        else []
    )
    return "\n".join(
        [
            *when,
            "On-demand `sfox.mint_user_tokens` for one user, sent by name to `SFOX_QUEUE` as a "
            "partner's app sends it (`send_task('sfox.mint_user_tokens', args=[[user]], "
            "queue='sfox')`), timed from the send until the sender finds its result stored (it "
            "looks every 5 ms), beside "
            "`sfox.run_nightly_orders` as the nightly section runs it (fresh workers, an empty "
            "window, a stand-in with no history for every row).",
            "",
            latency_table(results),
            "",
            f"- *bound*: one request's latency plus one slot of the window, "
            f"{config['latency'] * 1000:g} ms + period / limit at {config['rate']} = "
            f"{lanes['latency_bound_s']:.3f} s: what an on-demand mint that takes the next "
            "free slot of a full window waits at least, before Celery's own handling.",
            "",
            night_table(results),
            "",
            "- *bound*: the nightly section's, (requests − limit) / rate for one mint per "
            "batch and one order per user; *sliding-window minimum*, its too, "
            "(⌈requests / limit⌉ − 1) × period: the least time a sliding window really "
            "allows. *Their share*: the on-demand requests sent during "
            f"the night × period / limit ({lanes['slot_s']:.4f} s each): the time they take "
            "from the night's budget however they are ordered.",
            "",
            overhead(results),
            "",
            f"![on-demand latency during the night]({CHART_NAME})",
        ]
    )


def chart(results: dict[str, Any], path: Path) -> bool:
    """On-demand latency over the largest night with a stream; ``False`` if there is none."""
    runs = [r for r in _runs(results) if r["name"] == "stream" and r["users"] and r["samples"]]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = max(runs, key=lambda r: r["users"])
    lanes = results["lanes"]
    config = results["config"]
    ok = [(s[0], s[1]) for s in run["samples"] if s[2] and s[1] is not None]
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    every = _g(run["every_s"])
    ax.plot([x for x, _ in ok], [y for _, y in ok], marker=".", linestyle="-", lw=0.8,
            color="tab:blue", label=f"on-demand mint, one every {every} s")  # fmt: skip
    ax.axhline(lanes["latency_bound_s"], color="black", linestyle="--", lw=1,
               label=f"bound: latency + one slot ({lanes['latency_bound_s']:.3f} s)")  # fmt: skip
    idle = _run(_runs(results), "idle")
    if idle and idle["stream"]["p50"] is not None:
        ax.axhline(idle["stream"]["p50"], color="tab:green", linestyle=":", lw=1,
                   label=f"no night, p50 ({idle['stream']['p50']:.3f} s)")  # fmt: skip
    night_s = run["night"]["wall_s"]
    if night_s:
        ax.axvline(night_s, color="tab:gray", linestyle="-.", lw=1,
                   label=f"the night ends ({night_s:.0f} s)")  # fmt: skip
    ax.set_xlabel(f"seconds since the night of {_n(run['users'])} users was sent")
    ax.set_ylabel("send to result ready (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"On-demand mint latency during the nightly run: stand-in latency "
        f"{config['latency'] * 1000:g} ms, sFOX rule {config['sfox_rule']}, package limit "
        f"{config['rate']}, {config['workers']} worker × {config['concurrency']}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def splice(report: str, results: dict[str, Any]) -> str:
    """``report`` (a RESULTS.md) with its lanes section replaced by ``results``'s, or added."""
    body = section(results, apart=True)
    start = report.find(HEADING)
    if start >= 0:
        end = report.find("\n## ", start + len(HEADING))
        end = len(report) if end < 0 else end + 1
        return f"{report[:start]}{HEADING}\n\n{body}\n\n{report[end:]}"
    at = report.find(BEFORE)
    at = len(report) if at < 0 else at
    return f"{report[:at]}{HEADING}\n\n{body}\n\n{report[at:]}"


def main(argv: list[str] | None = None) -> int:
    """Put a lanes-only run into a report: ``python -m bench._report_lanes RESULTS_JSON [OUT]``.

    Writes ``lanes.png`` and replaces (or adds) the lanes section of ``OUT/RESULTS.md``
    (``bench/`` by default), leaving the other sections as the last full run wrote them.
    """
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m bench._report_lanes RESULTS_JSON [OUT_DIR]", file=sys.stderr)
        return 2
    results = json.loads(Path(args[0]).read_text())
    if not results.get("lanes"):
        print(f"{args[0]} holds no lanes section", file=sys.stderr)
        return 2
    out = Path(args[1]) if len(args) > 1 else Path(__file__).resolve().parent
    chart(results, out / CHART_NAME)
    report = out / "RESULTS.md"
    report.write_text(splice(report.read_text() if report.exists() else "", results))
    print(f"wrote {report} and {out / CHART_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
