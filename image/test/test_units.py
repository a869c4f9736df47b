"""The systemd units (checked by systemd-analyze inside the built overlay, where every command
they name exists), the first-boot script, the udev rules and journald limits."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from image_fixtures import *  # noqa: F403 (the amd64_image fixture)
from image_fixtures import BuiltImage

IMAGE = Path(__file__).resolve().parents[2] / "image"


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: `apt-get install -y systemd` (tests/run does)")
    return exe


@pytest.mark.slow
def test_systemd_analyze_verify_finds_nothing_to_say_about_the_units_in_the_overlay(
    amd64_image: BuiltImage,
) -> None:
    exe = systemd_analyze()
    root = amd64_image.root
    # The overlay lands on an OS that has systemd's own units (sysinit.target, ...): lend it
    # this host's, so that verify resolves the dependencies as on the device.
    system_units = root / "usr/lib/systemd/system"
    if not system_units.exists():
        host = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                    if (p / "sysinit.target").exists())  # fmt: skip
        shutil.copytree(host, system_units, symlinks=True)
    units = ["/etc/systemd/system/appliance.service",
             "/etc/systemd/system/appliance-firstboot.service"]  # fmt: skip
    proc = subprocess.run(
        [exe, "verify", "--man=no", f"--root={root}", *units], capture_output=True, text=True
    )
    # verify exits 0 on many problems (unknown keys, bad values): its output must be empty.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stderr


def test_systemd_analyze_reports_a_broken_unit_so_the_check_above_means_something(
    tmp_path: Path,
) -> None:
    exe = systemd_analyze()
    bad = tmp_path / "bad.service"
    bad.write_text(
        (IMAGE / "systemd/appliance.service")
        .read_text()
        .replace("ProtectSystem=strict", "ProtectSystm=strict")
    )
    proc = subprocess.run([exe, "verify", "--man=no", str(bad)], capture_output=True, text=True)
    assert "Unknown key" in proc.stderr and "ProtectSystm" in proc.stderr


def unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (IMAGE / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_the_service_is_hardened_notify_with_a_watchdog_and_writes_only_its_state_dir() -> None:
    svc = unit("appliance.service")
    assert svc["Type"] == ["notify"] and svc["WatchdogSec"] == ["30"]
    assert svc["User"] == ["appliance"] and svc["SupplementaryGroups"] == ["dialout"]
    assert svc["ProtectSystem"] == ["strict"] and svc["StateDirectory"] == ["appliance"]
    assert "ReadWritePaths" not in svc  # the state directory is the only writable path
    assert svc["Restart"] == ["on-failure"] and svc["RestartPreventExitStatus"] == ["2"]
    assert svc["NoNewPrivileges"] == ["true"] and svc["CapabilityBoundingSet"] == [""]
    first = unit("appliance-firstboot.service")
    assert first["Type"] == ["exec"]  # started at once: nothing waits for the engine build
    assert first["ConditionPathExists"] == ["!/var/lib/appliance/firstboot/done"]
    assert "Before" not in first and "appliance-firstboot" not in str(svc)


def test_first_boot_records_engine_build_and_selftest_and_marks_itself_done(
    tmp_path: Path,
) -> None:
    """The script runs this checkout's appliance (an engine build fails here: no TensorRT;
    the selftest passes on onnxruntime CPU); the result is recorded either way."""
    app = tmp_path / "appliance"
    app.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m appliance "$@"\n')
    app.chmod(0o755)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text('[[devices]]\nname = "m"\nprofile = "cnc-sim"\n[outbox]\npath = "o.sqlite"\n')
    state = tmp_path / "firstboot"
    env = {**os.environ, "APPLIANCE_BIN": str(app), "APPLIANCE_CONFIG": str(cfg),
           "APPLIANCE_FIRSTBOOT_DIR": str(state)}  # fmt: skip
    proc = subprocess.run(
        [str(IMAGE / "bin/appliance-firstboot")], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((state / "result.json").read_text())
    assert result["engine_build_rc"] == 1 and result["selftest_passed"] is True
    assert "tensorrt: not available here" in (state / "engine-build.log").read_text()
    assert json.loads((state / "selftest.json").read_text())["passed"] is True
    assert (state / "done").exists()


RULE = re.compile(
    r'(?P<key>[A-Z_]+)(\{(?P<attr>[A-Za-z_]+)\})?(?P<op>==|!=|\+=|=|:=)"(?P<value>[^"]*)"$'
)
MATCH_KEYS = {"ACTION", "SUBSYSTEM", "ENV", "ATTRS", "ATTR", "KERNELS", "DRIVER", "DRIVERS"}
ASSIGN_KEYS = {"SYMLINK", "GROUP", "MODE", "ENV", "ATTR", "GOTO", "LABEL"}


def test_the_udev_rules_parse_and_give_by_serial_and_by_port_links_to_usb_serial_ports() -> None:
    text = (IMAGE / "udev/70-appliance-serial.rules").read_text()
    links = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for part in line.split(", "):
            m = RULE.match(part.strip())
            assert m, f"line {n}: cannot parse {part!r}"
            key, op = m["key"], m["op"]
            known = MATCH_KEYS if op in ("==", "!=") else ASSIGN_KEYS
            assert key in known, f"line {n}: {key}{op}"
            if key == "SYMLINK":
                links.append(m["value"])
    assert any(v.startswith("appliance/by-serial/") and "ID_SERIAL_SHORT" in v for v in links)
    assert any(v.startswith("appliance/by-port/") and "ID_PATH_TAG" in v for v in links)
    labels = re.findall(r'LABEL="([^"]+)"', text)
    assert set(re.findall(r'GOTO="([^"]+)"', text)) <= set(labels)


def test_journald_is_bounded() -> None:
    conf = (IMAGE / "journald/appliance.conf").read_text()
    assert re.search(r"^SystemMaxUse=\d+M$", conf, re.M)
    assert re.search(r"^RuntimeMaxUse=\d+M$", conf, re.M)
