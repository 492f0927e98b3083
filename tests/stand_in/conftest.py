"""Fixtures for the stand-in's own tests: a fresh stand-in and a plain session each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tasks.testing import FakeSfox
from tests.stand_in.kit import KEY


@pytest.fixture
def fake() -> Iterator[FakeSfox]:
    with FakeSfox(KEY) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session
