"""The example alert rules, their Prometheus configuration and the Grafana dashboard in ops/.

Read and checked as data always; with ``promtool`` (``PROMTOOL``, or one on PATH:
``.ci/ensure-promtool`` unpacks Debian's, and ``.ci/run`` does so) the rules are also
checked and unit-tested by Prometheus's own tool, and every dashboard query is parsed
as PromQL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks._metrics import METRIC_NAMES
from tests.workers import ROOT

OPS = ROOT / "ops"
RULES = OPS / "prometheus" / "alerts.yml"
RULE_TESTS = OPS / "prometheus" / "alerts.test.yml"
PROMETHEUS_CONFIG = OPS / "prometheus" / "prometheus.yml"
DASHBOARD = OPS / "grafana" / "sfox-tokens.json"
PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    not PROMTOOL, reason="no promtool: PROMTOOL=$(.ci/ensure-promtool) make test"
)

#: Series a rule or panel may read: the workers' own, Flower's task events, scrape health.
KNOWN_SERIES = {
    *METRIC_NAMES,
    *(f"sfox_request_duration_seconds_{part}" for part in ("bucket", "sum", "count")),
    "flower_events_total",
    "up",
}
#: What the issue asks an operator to be alerted on, each by one rule.
REQUIRED_ALERTS = {
    "SfoxRateLimited",  # a 429 seen
    "SfoxUsersRefusedRising",
    "SfoxLimiterWaitsLong",
    "SfoxNightlyOrdersFailed",
    "SfoxNightlySummaryMissing",
}
_NAME = re.compile(r"\b([a-z_][a-z0-9_]*)\s*(?=\{|\[|\)|$)")
_PROMQL_WORDS = {
    "sum", "rate", "increase", "by", "on", "and", "or", "vector", "hour", "offset",
    "histogram_quantile", "le", "endpoint", "status",
}  # fmt: skip


def series_in(expr: str) -> set[str]:
    """The metric names an expression reads."""
    return {name for name in _NAME.findall(expr) if name not in _PROMQL_WORDS}


def rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_every_alert_reads_known_series_and_says_what_to_do():
    """Each rule is an alert with a severity, a summary and a description; it reads real series."""
    found = rules()
    assert {rule["alert"] for rule in found} >= REQUIRED_ALERTS
    for rule in found:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert series_in(rule["expr"]) <= KNOWN_SERIES, rule["alert"]
    # Every alert is fired by a test of its own (promtool runs them below).
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in found}


def test_the_dashboard_shows_every_metric_through_its_datasource_variable():
    """Every panel queries known series through ${datasource}; together they show every metric."""
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    read: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], panel["title"]
            read |= series_in(target["expr"])
    assert read <= KNOWN_SERIES
    for name in METRIC_NAMES:
        assert name in read or f"{name}_bucket" in read, name


@needs_promtool
def test_promtool_accepts_the_rules_and_their_tests_pass():
    """`promtool check rules`, `promtool test rules` and `promtool check config` all succeed."""
    here = RULES.parent
    for args in (
        ("check", "rules", RULES.name),
        ("test", "rules", RULE_TESTS.name),
        ("check", "config", PROMETHEUS_CONFIG.name),
    ):
        out = promtool(*args, cwd=here)
        assert out.returncode == 0, (args, out.stdout + out.stderr)


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """Each panel's query, with Grafana's variables filled in, parses as PromQL."""
    recording = [
        {
            "record": f"dashboard:query_{index}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".*"),
        }
        for index, expr in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    out = promtool("check", "rules", path.name, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(recording)} rules found" in out.stdout


def test_the_scrape_config_uses_the_compose_worker_port():
    """prometheus.yml scrapes the port the compose workers serve their metrics on."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    worker = compose["services"]["worker"]
    port = int(worker["environment"]["SFOX_METRICS_PORT"])
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["sfox-workers"]["dns_sd_configs"][0]["port"] == port
    assert config["rule_files"] == [RULES.name]
