"""The supervisor's own policies (wiring is covered end to end in tests/e2e)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.contracts import Envelope, Priority
from appliance.errors import ConfigError
from appliance.outbox import OutboxFullError
from appliance.runtime import Appliance


def make_app(tmp_path: Path, **sections: object) -> Appliance:
    data = {
        "devices": [{"name": "m", "profile": "cnc-sim"}],
        "outbox": {"path": "o.sqlite"},
        **sections,
    }
    return Appliance(parse_config(data, source="t", base_dir=tmp_path))


def test_a_full_outbox_is_counted_and_logged_once_instead_of_crashing_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(tmp_path)

    def full(envelopes: object) -> None:
        raise OutboxFullError("disk full (test)")

    # The real disk-full path (SQLite's "database or disk is full") is tested in tests/outbox;
    # here the outbox's append is replaced to check the supervisor's policy alone.
    monkeypatch.setattr(app.outbox, "append", full)
    env = Envelope("alerts/m", "alert", "t", Priority.ALERT, 1.0, {})
    app._append([env, env])
    app._append([env])
    assert app.append_failures == 3
    assert caplog.text.count("outbox full") == 1


def test_a_failing_outbox_disk_is_counted_and_logged_once_instead_of_crashing_acquisition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error from SQLite (a dying SD card) raised into the frame callback would stop
    the device's poller; the supervisor absorbs it, counts the lost envelopes, recovers."""
    app = make_app(tmp_path)
    failing = True
    stored: list[object] = []

    def append(envelopes: list[object]) -> None:
        if failing:
            raise sqlite3.OperationalError("disk I/O error")
        stored.extend(envelopes)

    monkeypatch.setattr(app.outbox, "append", append)
    env = Envelope("telemetry/m", "telemetry", "t", Priority.TELEMETRY, 1.0, {})
    with caplog.at_level(logging.INFO, logger="appliance.runtime"):
        app._append([env, env])
        app._append([env])
        failing = False
        app._append([env])
    assert app.append_failures == 3 and stored == [env]
    assert caplog.text.count("outbox failed: disk I/O error") == 1
    assert "outbox accepts messages again (3 lost so far)" in caplog.text


def test_a_window_length_other_than_the_models_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trained on 1.0 s windows"):
        make_app(tmp_path, features={"window_s": 2.0})
