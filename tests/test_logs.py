"""Worker logs: one line per event that matters, and never a task's result or a secret.

Celery's own ``Task ... succeeded in Xs`` line and the structured ``data`` it hands to
handlers must not carry the return value; the package's own lines say what happened
(batch minted, retry, refused users, rate-limit pause, the mint's outcome).
"""

from __future__ import annotations

import json
import logging
import re
import uuid

import pytest
from celery.app import trace

import tasks
from tasks import mint_user_tokens
from tasks.sealing import SEALED_PREFIX, derive_seal_key
from tasks.testing import Fault
from tasks.worker.logs import HideReturnValue
from tasks.worker.outcome import MintOutcome, summarise
from tests.conftest import ENTERPRISE_KEY
from tests.workers import WorkerProcess

#: Celery's success format as shipped, with the return value.
CELERY_SUCCESS_FORMAT = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"
#: A host's own success format without the return value.
SHORT_SUCCESS_FORMAT = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


class Records(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def trace_records():
    """Records reaching a handler on Celery's trace logger, after its filters."""
    handler = Records()
    logger = logging.getLogger("celery.app.trace")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_loading_the_package_leaves_celerys_format_and_adds_one_filter():
    """Importing tasks keeps Celery's own success format; one filter on its trace logger."""
    assert tasks.app is not None
    assert trace.LOG_SUCCESS == CELERY_SUCCESS_FORMAT
    filters = logging.getLogger("celery.app.trace").filters
    assert sum(isinstance(f, HideReturnValue) for f in filters) == 1


def test_a_partner_tasks_success_line_is_left_as_celery_writes_it(trace_records):
    """The filter touches only sfox.* records: a partner's task keeps its return value."""
    context = {"id": "t-2", "name": "payments.deposit", "return_value": "'ok'", "runtime": 0.1}
    trace.info(CELERY_SUCCESS_FORMAT, context)
    (record,) = trace_records
    assert record.getMessage() == "Task payments.deposit[t-2] succeeded in 0.1s: 'ok'"
    assert record.data["return_value"] == "'ok'"


@pytest.mark.parametrize("fmt", [CELERY_SUCCESS_FORMAT, SHORT_SUCCESS_FORMAT])
def test_success_record_loses_the_return_value_whatever_the_format(trace_records, fmt):
    """Celery's info() call keeps id, name and runtime; neither text nor data holds the result."""
    secret = SEALED_PREFIX + "sealed-token-" + uuid.uuid4().hex
    context = {
        "id": "t-1",
        "name": "sfox.mint_user_tokens",
        "return_value": f"{{'tokens': [{{'token': '{secret}'}}]}}",
        "runtime": 0.25,
        "args": "[1 user IDs: u1]",
        "kwargs": "{}",
    }
    trace.info(fmt, context)
    (record,) = trace_records
    assert record.getMessage() == "Task sfox.mint_user_tokens[t-1] succeeded in 0.25s"
    assert "return_value" not in record.data and "return_value" not in record.args
    assert record.data["id"] == "t-1" and record.data["runtime"] == 0.25
    assert secret not in repr(record.__dict__)
    assert "return_value" in context  # Celery's own dict is left alone


def test_other_trace_records_pass_unchanged(trace_records):
    """Records without a return value (failures, retries) are not touched by the filter."""
    logging.getLogger("celery.app.trace").info("Task %s[%s] retry: %s", "n", "i", "Retry in 1s")
    (record,) = trace_records
    assert record.getMessage() == "Task n[i] retry: Retry in 1s"


def test_mint_outcome_reads_as_the_contract_dict_and_reprs_short():
    """The worker-side result is the contract's dict to JSON and to readers, a summary to repr."""
    from kombu.utils.json import dumps, loads

    sealed = SEALED_PREFIX + "x"
    result = {
        "tokens": [{"partner_user_id": "a", "token": sealed, "expires": "2026-01-01T00:00:00Z"}],
        "failed": [{"user_id": f"u{i}", "status": 404, "error": "nope"} for i in range(7)],
    }
    outcome = MintOutcome(result)
    assert loads(dumps({"result": outcome})) == {"result": result}
    assert dict(outcome) == result and outcome["tokens"] == result["tokens"]
    assert repr(outcome) == "{tokens: 1 sealed, failed: 7 [u0, u1, u2, u3, u4, …]}"
    assert summarise({"tokens": [], "failed": []}) == "{tokens: 0 sealed, failed: 0}"


def test_direct_and_eager_calls_still_return_a_plain_dict(fake_sfox):
    """Outside a worker (a direct call, apply()) the task returns the contract's plain dict."""
    direct = mint_user_tokens(["direct-1"])
    eager = mint_user_tokens.apply((["eager-1"],)).get()
    assert type(direct) is dict and type(eager) is dict
    assert [t["partner_user_id"] for t in eager["tokens"]] == ["eager-1"]


@pytest.mark.slow
def test_worker_log_at_debug_says_what_happened_in_one_line_each(fake_sfox, tmp_path, redis_client):
    """A real worker at DEBUG logs each event in one line; no result, sealed or not, no secret."""
    records_file = tmp_path / "records.jsonl"
    proc = WorkerProcess.solo(
        "logs",
        tmp_path,
        fake_sfox.url,
        {"SFOX_TEST_RECORDS_FILE": str(records_file)},
        extra_args=["--include", "tests.logcapture"],
    )
    # Given a batch with a refused user, a 503, and a 429 (SFOX_RATE_LIMIT_PENALTY is 0.5 here),
    fake_sfox.refuse("log-u7", status=404, message="user not found")
    fake_sfox.inject(Fault.status(503), Fault.status(429))
    user_ids = [f"log-u{i}" for i in range(1, 13)]
    proc.start()
    try:
        # when a real worker mints them,
        mint = mint_user_tokens.apply_async((user_ids,), queue="logs")
        result = mint.get(timeout=30)
    finally:
        proc.stop()
    assert len(result["tokens"]) == 11
    log = proc.log()
    lines = log.splitlines()

    def line(pattern: str) -> str:
        found = [text for text in lines if re.search(pattern, text)]
        assert found, f"no line matches {pattern!r}:\n{log}"
        return found[0]

    # then each event is one line that says what, how many, how long and why,
    line(r"sFOX user-token request for 12 user\(s\): attempt 1 of \d+ failed \(sFOX answered 503")
    line(r"retrying in \d+\.\d+ s")
    line(
        r"sFOX answered 429 to user-token request for 12 user\(s\): "
        r"pausing every worker for 0\.5 s \(SFOX_RATE_LIMIT_PENALTY\)"
    )
    line(r"sFOX rate-limit pause: waiting 0\.\d s before the next request")
    line(r"users refused by sFOX: 1 \(log-u7: 404 user not found\)")
    line(r"minted \d+ of \d+ token\(s\) in one request in \d+ ms")
    line(r"mint done for 12 user\(s\) in \d+\.\d+ s: \{tokens: 11 sealed, failed: 1 \[log-u7\]\}")
    # Celery's success line ends at the runtime,
    success = line(rf"Task sfox.mint_user_tokens\[{mint.id}\] succeeded in")
    assert re.search(r"succeeded in \d+(\.\d+)?(e-\d+)?s$", success), success
    # and neither the log nor the structured records hold a result or a secret.
    records = [json.loads(text) for text in records_file.read_text().splitlines()]
    successes = [r for r in records if "succeeded in" in r["message"]]
    assert len(successes) == 1
    assert successes[0]["data"]["id"] == mint.id
    assert "return_value" not in successes[0]["data"]
    assert "return_value" not in successes[0]["args"]
    structured = records_file.read_text()
    assert "mint done for 12 user(s)" in structured  # the capture really saw the worker's records
    secrets_ = [ENTERPRISE_KEY, derive_seal_key(ENTERPRISE_KEY), *fake_sfox.issued_tokens]
    for text in (log, structured):
        assert SEALED_PREFIX not in text
        for secret in secrets_:
            assert secret not in text
