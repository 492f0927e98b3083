"""The testing kit as a partner's suite uses it: the worked example (docs/guides/testing-kit.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasks.testing import FakeSfox, Fault
from tasks.testing import fixtures as kit

# What `pytest_plugins = ["tasks.testing.fixtures"]` gives a partner's suite; here the kit's
# fixtures override the suite's own session-wide stand-in of the same name.
fake_sfox = kit.fake_sfox
sfox_env = kit.sfox_env

SFOX_TOKENS = str(Path(sys.executable).with_name("sfox-tokens"))


def test_a_job_reading_the_environment_meets_the_scripted_faults(sfox_env: FakeSfox):
    """sfox_env points the environment at the stand-in; its faults and refusals reach the job."""
    sfox_env.inject(Fault.status(503))
    sfox_env.refuse("ghost")
    out = subprocess.run(
        [SFOX_TOKENS, "mint", "--local", "u1", "ghost"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SFOX_RETRY_WAIT_INITIAL": "0.01"},
    )
    assert out.returncode == 1, out.stderr  # mint exits 1 when a user was refused
    assert "1 minted, 1 not, of 2 users" in out.stdout
    assert sfox_env.pending_faults == []
    assert [user for user, _expiry in sfox_env.issued_tokens.values()] == ["u1"]


def test_fake_sfox_alone_leaves_the_environment_alone(fake_sfox: FakeSfox):
    """The bare fixture serves on loopback and changes no variable."""
    assert fake_sfox.url.startswith("http://127.0.0.1:")
    assert os.environ.get("SFOX_API_URL") != fake_sfox.url
