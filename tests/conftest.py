"""Shared fixtures: free ports and a real Mosquitto broker per test (its own config file)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.demo.mosquitto import MosquittoProcess, free_port, mosquitto_binary, wait_port

__all__ = ["Mosquitto", "free_port", "wait_port"]

Mosquitto = MosquittoProcess


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A running Mosquitto broker on a free port (persistence on), stopped after the test."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run `apt-get install -y mosquitto` (.ci/run does)")
    broker = MosquittoProcess(port=free_port(), workdir=tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
