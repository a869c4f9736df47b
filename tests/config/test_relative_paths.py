"""Relative paths in the config resolve against the config file's folder, not the working
directory (issue 9, defect 4): systemd starts the service in `/`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.runtime import Appliance

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "drivers" / "profiles" / "cnc-sim.toml"


@pytest.fixture
def cell(tmp_path: Path) -> Path:
    """``conf/cell.toml`` whose profiles, model, certificates, password and outbox are all
    given relative to ``conf/``."""
    conf = tmp_path / "conf"
    (conf / "profiles").mkdir(parents=True)
    shutil.copy(PROFILE, conf / "profiles" / "mill.toml")
    shutil.copy(PROFILE, conf / "lathe.toml")
    shutil.copytree(REPO / "models" / "cnc_anomaly", conf / "models" / "anomaly")
    path = conf / "cell.toml"
    path.write_text(
        '[[devices]]\nname = "mill"\nprofile = "profiles/mill.toml"\n'
        '[[devices]]\nname = "lathe"\nport = 503\nprofile = "lathe.toml"\n'
        '[[devices]]\nname = "sim"\nport = 504\nprofile = "cnc-sim"\n'
        '[engine]\nmodel = "models/anomaly"\n'
        '[outbox]\npath = "data/outbox.sqlite"\n'
        '[mqtt]\ntls = true\nca_file = "certs/ca.pem"\ncert_file = "certs/c.pem"\n'
        'key_file = "certs/c.key"\nusername = "u"\npassword_file = "secret"\n'
    )
    return path


def test_paths_resolve_against_the_config_folder_from_another_cwd(
    cell: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    conf = cell.parent
    cfg = load_config(cell)
    mill, lathe, sim = cfg.devices
    assert mill.profile == str(conf / "profiles" / "mill.toml") and len(mill.registers) == 10
    assert lathe.profile == str(conf / "lathe.toml") and len(lathe.registers) == 10
    assert sim.profile == "cnc-sim" and len(sim.registers) == 10  # a name: the shipped one
    assert cfg.engine.model == str(conf / "models" / "anomaly")
    assert cfg.outbox.path == str(conf / "data" / "outbox.sqlite")
    assert cfg.mqtt.ca_file == str(conf / "certs" / "ca.pem")
    assert cfg.mqtt.cert_file == str(conf / "certs" / "c.pem")
    assert cfg.mqtt.key_file == str(conf / "certs" / "c.key")
    assert cfg.mqtt.password_file == str(conf / "secret")
    assert Appliance(cfg).bundle.directory == conf / "models" / "anomaly"


def test_a_relative_config_path_given_from_another_cwd_still_resolves(
    cell: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(cell.parent.parent)
    cfg = load_config(Path("conf") / "cell.toml")
    assert cfg.devices[0].profile == str(cell.parent / "profiles" / "mill.toml")


def test_check_config_run_from_the_root_folder_accepts_the_relative_paths(cell: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "appliance", "check-config", str(cell)],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "3 devices" in res.stdout


def test_a_missing_profile_path_names_the_resolved_file(cell: Path) -> None:
    cell.write_text('[[devices]]\nname = "mill"\nprofile = "profiles/nope.toml"\n')
    res = subprocess.run(
        [sys.executable, "-m", "appliance", "check-config", str(cell)],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "devices[0] (mill).profile" in res.stderr and str(
        cell.parent / "profiles" / "nope.toml"
    ) in (res.stderr)
