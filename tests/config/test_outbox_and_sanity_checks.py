"""Config checks the types alone let through (issue 10): a disk budget too small to hold the
outbox itself, no devices, an empty host, non-finite numbers; `drain_timeout_s` reaches stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import load_config, outbox_min_budget_bytes, outbox_wal_bytes
from appliance.errors import ConfigError

DEVICE = '[[devices]]\nname = "m"\nprofile = "cnc-sim"\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (DEVICE + "[outbox]\ndisk_budget_mb = 0.01\n", "outbox.disk_budget_mb = 0.01 cannot hold"),
        (DEVICE + "[outbox]\ndisk_budget_mb = 1e-9\n", "outbox.disk_budget_mb = 1e-09 cannot"),
        ("[mqtt]\nhost = '127.0.0.1'\n", "appliance.allow_no_devices = true"),
        (DEVICE + "[mqtt]\nhost = ''\n", "mqtt.host: must not be empty"),
        ('[[devices]]\nname = "m"\nprofile = "cnc-sim"\nhost = ""\n', "devices[0] (m).host"),
        (DEVICE + "timeout_s = inf\n", "devices[0].timeout_s: must be a finite number"),
        (
            DEVICE + '[[alerts.rules]]\nname = "x"\nchannel = "spindle_temp"\nabove = nan\n',
            "alerts.rules[0].above: must be a finite number",
        ),
        (
            DEVICE + '[[alerts.rules]]\nname = "x"\nchannel = "spindle_temp"\nabove = inf\n',
            "alerts.rules[0].above: must be a finite number",
        ),
        (DEVICE + "[mqtt]\nreconnect_max_s = inf\n", "mqtt.reconnect_max_s: must be a finite"),
        (DEVICE + "[appliance]\ndrain_timeout_s = inf\n", "appliance.drain_timeout_s: must be"),
    ],
)
def test_refused_at_load_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)
    assert needle in str(exc.value)


def test_check_config_refuses_a_tiny_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, DEVICE + "[outbox]\ndisk_budget_mb = 0.01\n")
    assert main(["check-config", str(path)]) == 2
    assert "outbox.disk_budget_mb" in capsys.readouterr().err


def test_smallest_budget_holds_pages_wal_and_a_batch(tmp_path: Path) -> None:
    least = outbox_min_budget_bytes()
    assert least >= 6 * 4096 + outbox_wal_bytes(least) + 64 * 1024
    ok = write(tmp_path, DEVICE + f"[outbox]\ndisk_budget_mb = {least / 2**20 + 0.001}\n")
    assert load_config(ok).outbox.disk_budget_mb > 0


def test_no_devices_allowed_when_said_explicitly(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[appliance]\nallow_no_devices = true\n"))
    assert cfg.devices == ()


def test_drain_timeout_s_is_read(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DEVICE + "[appliance]\ndrain_timeout_s = 2.5\n"))
    assert cfg.appliance.drain_timeout_s == 2.5
