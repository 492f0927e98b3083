"""The report's nightly and egress sections, and their targets, from ``results.json``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: The issue's nightly targets.
TARGET_BOUND = 0.95
TARGET_VS_PLAIN = 1.05
#: Egress runs count as scaling when k addresses reach this share of k times one's rate.
SCALING_SHARE = 0.9


def _n(value: float) -> str:
    """A count, with thousands separators."""
    return f"{value:,.0f}"


def _s(value: float) -> str:
    """Seconds, with two decimals under 100 and one above."""
    return f"{value:,.2f}" if value < 100 else f"{value:,.1f}"


def section_rows(results: dict[str, Any], section: str) -> list[dict[str, Any]]:
    """The rows one section of the run measured."""
    return [r for r in results["rows"] if r["section"] == section]


def nightly_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return section_rows(results, "nightly")


def egress_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return section_rows(results, "egress")


def _pick(rows: Iterable[dict[str, Any]], prefix: str, users: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["approach"].startswith(prefix) and r["users"] == users), None)


def _share(row: dict[str, Any], bound: float | None = None) -> str:
    """The bound's time over the run's; empty when no limit bounds the run."""
    bound_s = row["bound_s"] if bound is None else bound
    return f"{bound_s / row['wall_s']:.0%}" if row["wall_s"] and bound_s else ""


def _bound_of(group: Iterable[dict[str, Any]]) -> float:
    return next((r["wall_s"] for r in group if r["approach"] == "bound"), 0.0)


def _shared(row: dict[str, Any]) -> bool:
    """An egress run of several addresses in one scope (the default, one budget)."""
    return len(row["addresses"]) > 1 and row["approach"].endswith(", 1 scope")


def _age(row: dict[str, Any]) -> str:
    if row.get("token_age_max_s") is None:
        return ""
    return f"{row['token_age_max_s']:.1f} / {row['token_age_p99_s']:.1f}"


def nightly_table(results: dict[str, Any]) -> str:
    rows = nightly_rows(results)
    if not rows:
        return "*Not run (`--sections` left out `nightly`).*"
    ttl = results["config"].get("token_result_ttl", 900)
    lines = [
        "| N | approach | wall (s) | last order at (s) | requests: mints + re-mints + orders | "
        f"429s | users minted twice | token age at use, max / p99 (s; TTL {ttl}) | "
        "peak RSS (MB) largest / total | of bound | of sliding-window minimum | "
        "time ÷ plain loop |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {"package": 0, "plain": 1, "bound": 2, "sliding-window": 3}
    sizes = sorted({r["users"] for r in rows})
    for users in sizes:
        group = sorted(
            (r for r in rows if r["users"] == users),
            key=lambda r: order.get(r["approach"].split(":")[0].split(" ")[0], 3),
        )
        plain = _pick(group, "plain", users)
        least = _pick(group, "sliding-window minimum", users)
        for row in group:
            requests = f"{_n(row['mints'])} + {_n(row['remints'])} + {_n(row['orders'])}"
            if row["approach"] == "bound":
                lines.append(
                    f"| {_n(users)} | **bound** ((requests − limit) / rate) | "
                    f"{_s(row['wall_s'])} | | {requests} | | | | | 100% | | |"
                )
                continue
            if row["approach"] == "sliding-window minimum":
                lines.append(
                    f"| {_n(users)} | **sliding-window minimum** ((⌈requests / limit⌉ − 1) "
                    f"× period) | {_s(row['wall_s'])} | | {requests} | | | | | "
                    f"{_share(row, bound=_bound_of(group))} | 100% | |"
                )
                continue
            of_bound = _share(row)
            of_least = (
                f"{least['wall_s'] / row['wall_s']:.0%}"
                if least and least["wall_s"] and row["wall_s"]
                else ""
            )
            vs_plain = (
                f"{row['wall_s'] / plain['wall_s']:.2f}×"
                if plain and plain["wall_s"] and row is not plain
                else ("1.00×" if row is plain else "")
            )
            rss = (
                f"{row['rss_largest_mb']:.1f} / {row['rss_total_mb']:.1f}"
                if row["approach"].startswith("package")
                else f"{row['rss_largest_mb']:.1f}"
            )
            lines.append(
                f"| {_n(users)} | {row['approach']} | {_s(row['wall_s'])} | "
                f"{_s(row['last_order_s'])} | {requests} | {row['rate_limited']} | "
                f"{row['minted_twice']} | {_age(row)} | {rss} | {of_bound} | {of_least} | "
                f"{vs_plain} |"
            )
    notes = [
        f"- {row['approach']}, N = {_n(row['users'])}: {note}"
        for row in rows
        for note in row["notes"]
    ]
    if notes:
        lines += ["", "Notes on single runs:", "", *notes]
    return "\n".join(lines)


def nightly_notes(results: dict[str, Any]) -> str:
    config = results["config"]
    threads = config["workers"] * config["concurrency"]
    return "\n".join(
        [
            "- *package*: `sfox.run_nightly_orders(run_date=..., orders_file=...)` sent by name "
            f"to {config['workers']} fresh worker(s) × {config['concurrency']} processes, timed "
            "from the send until its summary is ready; the benchmark knows only the task's "
            "name, keywords and summary. *plain nightly loop*: one process reads the same "
            "orders file, mints a batch, places that batch's orders from "
            f"{threads} threads through one `requests.Session`, and mints the next batch as "
            "the last one's orders are taken; one client-side sliding window at "
            f"{config['rate']} for mints and orders alike, a re-mint after a 401 "
            "(`bench/_plain.py`).",
            "- *bound*: a sliding window lets the first `limit` requests go at once and the rest "
            f"at `limit / period` a second: (requests − limit) / rate at {config['rate']} for "
            "one mint per batch and one order per user. No client reaches it: a steady stream "
            "right after a full first window would put twice the limit into the window that "
            "starts with the burst. *Sliding-window minimum*: any span of k periods holds at "
            "most k × limit requests, so the last request leaves no sooner than "
            "(⌈requests / limit⌉ − 1) periods after the first, latency aside. The two are "
            "far apart when a run lasts a few windows, and close when it lasts many.",
            "- Counted by the stand-in, the same way for every approach: requests by kind "
            "(a re-mint is `POST /v1/enterprise/user-tokens/{id}`), 429s, users issued more than "
            "one token, and for each order the seconds since its token was minted "
            "(*token age at use*). *Last order at*: from the start until the last order "
            "arrived. *Peak RSS* as above.",
        ]
    )


def egress_table(results: dict[str, Any]) -> str:
    rows = egress_rows(results)
    if not rows:
        return "*Not run (`--sections` left out `egress`).*"
    lines = [
        "| egress addresses | scopes | users | requests | wall (s) | requests/s | "
        "× one address | of bound | 429s | per address: requests, 429s, busiest window |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base = next((r for r in rows if len(r["addresses"]) == 1), None)
    base_rate = base["requests"] / base["wall_s"] if base and base["wall_s"] else 0.0
    for row in rows:
        rate = row["requests"] / row["wall_s"] if row["wall_s"] else 0.0
        scopes = row["approach"].rsplit(", ", 1)[-1].split(" ")[0]
        per = "; ".join(
            f"{ip}: {e['requests']}, {e['rate_limited']}, {e['max_requests_in_window']}"
            for ip, e in row["addresses"].items()
        )
        lines.append(
            f"| {len(row['addresses'])} | {scopes} | {_n(row['users'])} | {_n(row['requests'])} "
            f"| {_s(row['wall_s'])} | {rate:.1f} | "
            f"{(rate / base_rate) if base_rate else 0:.2f}× | "
            f"{_share(row)} | "
            f"{row['rate_limited']} | {per} |"
        )
    config = results["config"]
    lines += [
        "",
        f"- Mint tasks of {config.get('egress_chunk', 0)} users in batches of "
        f"{config.get('egress_batch', 0)} (small batches: the limit counts requests, so this "
        f"keeps the tokens few), {config.get('egress_requests', 0)} requests per budget; one "
        f"worker × {config.get('egress_concurrency', 0)} processes per address, sending from it "
        "(`SFOX_SOURCE_ADDRESS`), each with a scope of its own (`SFOX_RATE_LIMIT_SCOPE`) or, in "
        "the last row, all in one scope. The stand-in counts sFOX's rule per client address.",
        "- *of bound*: (requests − budgets × limit) / (budgets × rate) over the run's time. "
        "*× one address*: requests per second over the one-address run's.",
    ]
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the nightly run and the egress scaling."""
    out: list[tuple[str, str, str]] = []
    rows = nightly_rows(results)
    measured = [r for r in rows if r["approach"] not in ("bound", "sliding-window minimum")]
    egress = egress_rows(results)
    if measured:
        largest = max(r["users"] for r in measured)
        pkg = _pick(rows, "package", largest)
        plain = _pick(rows, "plain", largest)
        least = _pick(rows, "sliding-window minimum", largest)
        if pkg and pkg["wall_s"] and pkg["bound_s"]:  # no bound when no limit holds it
            share = pkg["bound_s"] / pkg["wall_s"]
            also = (
                f"; {least['wall_s'] / pkg['wall_s']:.1%} of the sliding-window minimum "
                f"({_s(least['wall_s'])} s)"
                if least and least["wall_s"]
                else ""
            )
            out.append(
                (
                    f"nightly: ≥ 95% of the bound at {_n(largest)} users",
                    f"{share:.1%} ({_s(pkg['wall_s'])} s against {_s(pkg['bound_s'])} s){also}",
                    "met" if share >= TARGET_BOUND else f"missed ({share:.1%} against ≥ 95%)",
                )
            )
        if pkg and plain and plain["wall_s"]:
            ratio = pkg["wall_s"] / plain["wall_s"]
            out.append(
                (
                    f"nightly: within 5% of the plain loop's time at {_n(largest)} users",
                    f"{ratio:.3f}× ({_s(pkg['wall_s'])} s against {_s(plain['wall_s'])} s)",
                    "met" if ratio <= TARGET_VS_PLAIN else f"missed ({ratio:.2f}× against ≤ 1.05×)",
                )
            )
        limited = sum(r["rate_limited"] for r in measured)
        out.append(
            (
                "nightly: zero 429s",
                f"{limited} in {len(measured)} runs; busiest window at the stand-in: "
                f"{max(r['max_in_window'] for r in measured)} requests",
                "met" if limited == 0 else "missed",
            )
        )
        twice = [r for r in measured if r["approach"].startswith("package")]
        count = sum(r["minted_twice"] for r in twice)
        out.append(
            (
                "nightly: no user minted twice in a run without a crash (package)",
                f"{count} user(s) issued a second token in {len(twice)} run(s)",
                "met" if count == 0 else "missed",
            )
        )
        ttl = results["config"].get("token_result_ttl", 900)
        oldest = max((r["token_age_max_s"] or 0.0) for r in measured)
        out.append(
            (
                "nightly: no token older than SFOX_TOKEN_RESULT_TTL at use",
                f"oldest {oldest:.1f} s against {ttl} s",
                "met" if oldest <= ttl else "missed",
            )
        )
    if egress:
        own = [r for r in egress if not _shared(r) and r["wall_s"]]
        base = next((r for r in own if len(r["addresses"]) == 1), None)
        if base:
            base_rate = base["requests"] / base["wall_s"]
            ratios = {len(r["addresses"]): r["requests"] / r["wall_s"] / base_rate for r in own}
            scaling = ", ".join(f"{k} addresses: {x:.2f}×" for k, x in sorted(ratios.items()))
            short = [k for k, x in ratios.items() if x < SCALING_SHARE * k]
            out.append(
                (
                    "egress: throughput scales with the addresses, a scope each",
                    f"requests/s against one address's: {scaling}",
                    "met (each within 10% of k×)"
                    if not short
                    else f"missed at {', '.join(map(str, sorted(short)))} address(es)",
                )
            )
        limited = sum(r["rate_limited"] for r in egress)
        out.append(
            (
                "egress: 0 429s at every address",
                f"{limited} in {len(egress)} runs",
                "met" if limited == 0 else "missed",
            )
        )
    return out
