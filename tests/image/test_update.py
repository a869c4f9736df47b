"""``appliance update``: verified before anything is touched, installed beside, switched, checked,
rolled back by itself; the state directory survives. A temporary folder stands in for ``/``.

The bundles here are made by the test in image/build's layout, with a release whose
``venv/bin/appliance`` is a small shell script running this checkout's appliance (the real
selftest, the real ``run``) — a stand-in for a full venv, which only runs inside the target's
root (image/test/test_image_chroot.py builds and runs the real one)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.cli import main
from appliance.config import load_config
from appliance.demo.mosquitto import free_port
from appliance.runtime import Appliance
from appliance.simulate.cell import SimulatedCell
from appliance.update import (
    Layout,
    UpdateError,
    install_release,
    ready_url_check,
    selftest_check,
    switch_current,
    update,
)

GOOD = f'#!/bin/sh\nexec "{sys.executable}" -m appliance "$@"\n'
BAD_SELFTEST = (
    '#!/bin/sh\nif [ "$1" = selftest ]; then echo "selftest: no backend passed" >&2; exit 1; fi\n'
    + GOOD.split("\n", 1)[1]
)


def pem_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_bundle(
    out: Path,
    release: str,
    key: Ed25519PrivateKey,
    script: str = GOOD,
    extra: Callable[[tarfile.TarFile], None] | None = None,
) -> Path:
    """A signed bundle in image/build's layout: tarball, .sha256, .sig."""
    src = out / f"src-{release}"
    rel = src / "opt/appliance/releases" / release
    (rel / "venv/bin").mkdir(parents=True)
    (rel / "manifest.json").write_text(json.dumps({"version": release, "release": release}))
    exe = rel / "venv/bin/appliance"
    exe.write_text(script)
    exe.chmod(0o755)
    (rel / "venv/bin/python3").symlink_to(sys.executable)
    name = f"appliance-{release}-amd64.tar.gz"
    bundle = out / name
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(src / "opt", arcname="opt")
        if extra is not None:
            extra(tar)
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    sha = out / (name + ".sha256")
    sha.write_text(f"{digest}  {name}\n")
    (out / (name + ".sig")).write_bytes(key.sign(sha.read_bytes()))
    return bundle


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash or link target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def device(tmp_path: Path, key: Ed25519PrivateKey) -> Layout:
    """A root with release 1.0 installed and current, the update key, and a state dir."""
    root = tmp_path / "root"
    layout = Layout(root)
    layout.keys_dir.mkdir(parents=True)
    (layout.keys_dir / "build.pub").write_bytes(pem_public(key))
    first = make_bundle(tmp_path, "1.0", key)
    install_release(first, layout, "1.0")
    switch_current(layout, "1.0")
    state = root / "var/lib/appliance"
    (state / "engines").mkdir(parents=True)
    (state / "engines/cnc_anomaly-0123.engine").write_bytes(b"plan")
    (state / "outbox.sqlite").write_bytes(b"outbox bytes")
    return layout


class Restarts:
    """The restart seam: counts calls and records which release was current each time."""

    def __init__(self) -> None:
        self.calls: list[str | None] = []

    def __call__(self, layout: Layout) -> None:
        self.calls.append(layout.current_release())


def test_an_update_installs_beside_switches_current_restarts_and_runs_the_new_selftest(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey
) -> None:
    bundle = make_bundle(tmp_path, "1.1", key)
    state_before = snapshot(device.root / "var")
    restarts = Restarts()
    status = update(bundle, device, restart=restarts, checks=[selftest_check(120)])
    assert device.current_release() == "1.1"
    assert os.readlink(device.current) == "releases/1.1"
    assert os.readlink(device.previous) == "releases/1.0"
    assert (device.releases / "1.0/venv/bin/appliance").is_file()  # the old one stays
    assert restarts.calls == ["1.1"]
    assert status["outcome"] == "ok" and status["previous"] == "1.0"
    assert json.loads(device.status_file.read_text())["outcome"] == "ok"
    assert snapshot(device.root / "var") == state_before
    assert not list(device.releases.glob(".*"))  # no partial folder left


def test_a_failing_selftest_rolls_back_to_the_previous_release_and_restarts_it(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey
) -> None:
    bundle = make_bundle(tmp_path, "1.1", key, script=BAD_SELFTEST)
    state_before = snapshot(device.root / "var")
    restarts = Restarts()
    with pytest.raises(
        UpdateError, match=r"selftest failed .*no backend passed.*rolled back to 1\.0"
    ):
        update(bundle, device, restart=restarts, checks=[selftest_check(120)])
    assert device.current_release() == "1.0"
    assert restarts.calls == ["1.1", "1.0"]
    status = json.loads(device.status_file.read_text())
    assert status["outcome"] == "rolled back" and "selftest failed" in status["error"]
    assert snapshot(device.root / "var") == state_before


def test_a_failing_restart_rolls_back(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey
) -> None:
    bundle = make_bundle(tmp_path, "1.1", key)
    calls: list[str | None] = []

    def restart(layout: Layout) -> None:
        calls.append(layout.current_release())
        if layout.current_release() == "1.1":
            raise UpdateError("systemctl restart appliance.service failed: timeout")

    with pytest.raises(UpdateError, match="rolled back to 1.0"):
        update(bundle, device, restart=restart, checks=[])
    assert device.current_release() == "1.0" and calls == ["1.1", "1.0"]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("tamper", "sha256 .* does not match"),
        ("other-key", "not a valid signature by any key"),
        ("no-sig", r"\.sig: missing"),
        ("no-sha", r"\.sha256: missing"),
        ("no-keys", "no update keys"),
    ],
)
def test_a_bundle_that_fails_verification_touches_nothing(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey, damage: str, message: str
) -> None:
    bundle = make_bundle(
        tmp_path, "1.1", Ed25519PrivateKey.generate() if damage == "other-key" else key
    )
    if damage == "tamper":
        with bundle.open("ab") as f:
            f.write(b"\0")
    elif damage == "no-sig":
        bundle.with_name(bundle.name + ".sig").unlink()
    elif damage == "no-sha":
        bundle.with_name(bundle.name + ".sha256").unlink()
    elif damage == "no-keys":
        (device.keys_dir / "build.pub").unlink()
    before = snapshot(device.root)
    restarts = Restarts()
    with pytest.raises(UpdateError, match=message):
        update(bundle, device, restart=restarts, checks=[])
    assert snapshot(device.root) == before and restarts.calls == []


def test_a_signed_bundle_with_a_member_escaping_the_root_touches_nothing(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey
) -> None:
    evil = tmp_path / "evil"
    evil.write_text("x")

    def add_evil(tar: tarfile.TarFile) -> None:
        tar.add(evil, arcname="opt/appliance/releases/1.1/../../../../etc/passwd")

    bundle = make_bundle(tmp_path, "1.1", key, extra=add_evil)
    before = snapshot(device.root)
    with pytest.raises(UpdateError, match="escapes the root"):
        update(bundle, device, restart=None, checks=[])
    assert snapshot(device.root) == before


def test_updating_to_the_current_release_is_refused(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey
) -> None:
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(UpdateError, match="already current"):
        update(make_bundle(again, "1.0", key), device, restart=None, checks=[])


def test_old_releases_beyond_three_are_pruned_but_never_current_or_previous(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey
) -> None:
    for i, release in enumerate(["1.1", "1.2", "1.3", "1.4"]):
        os.utime(device.releases / device.current_release(), (i, i))  # type: ignore[operator]
        update(make_bundle(tmp_path, release, key), device, restart=None, checks=[])
    assert sorted(p.name for p in device.releases.iterdir()) == ["1.2", "1.3", "1.4"]
    assert device.current_release() == "1.4" and os.readlink(device.previous) == "releases/1.3"


def test_the_cli_updates_a_root_and_exits_1_with_the_reason_on_rollback(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_bundle(tmp_path, "1.1", key)
    assert main(["update", str(good), "--root", str(device.root), "--timeout-s", "120"]) == 0
    assert "release 1.1 is current (was 1.0)" in capsys.readouterr().out
    bad = make_bundle(tmp_path, "1.2", key, script=BAD_SELFTEST)
    assert main(["update", str(bad), "--root", str(device.root), "--timeout-s", "120"]) == 1
    assert "rolled back to 1.1" in capsys.readouterr().err
    assert device.current_release() == "1.1"


# -- the outbox survives an update and its rollback ------------------------------------------


def write_config(layout: Layout, sim_port: int, mqtt_port: int) -> Path:
    cfg = layout.config
    cfg.parent.mkdir(parents=True, exist_ok=True)
    state = layout.root / "var/lib/appliance"
    cfg.write_text(
        f"""
[appliance]
id = "cell-up"
[[devices]]
name = "cnc-1"
host = "127.0.0.1"
port = {sim_port}
profile = "cnc-sim"
poll_interval_ms = 50
[outbox]
path = "{state / "outbox.sqlite"}"
[engine]
model = "cnc_anomaly"
cache_dir = "{state / "engines"}"
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
tls = false
reconnect_min_s = 0.2
reconnect_max_s = 0.5
"""
    )
    return cfg


def run_appliance(cfg_path: Path, sim_port: int, seconds: float) -> dict[str, object]:
    """Run the appliance as the current release would (same config, same state)."""
    cfg = load_config(cfg_path)

    async def go() -> dict[str, object]:
        async with SimulatedCell(machines=1, ports=[sim_port]):
            app = Appliance(cfg)
            await app.start()
            try:
                await asyncio.sleep(seconds)
            finally:
                await app.stop(drain_timeout_s=3.0)
            return app.stats()

    return asyncio.run(go())


@pytest.mark.broker
@pytest.mark.slow
def test_undelivered_outbox_messages_survive_an_update_and_its_rollback_and_are_all_delivered(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey, mosquitto: object
) -> None:
    (device.root / "var/lib/appliance/outbox.sqlite").unlink()
    sim_port = free_port()
    cfg_path = write_config(device, sim_port, mqtt_port=free_port())  # no broker there yet
    stats = run_appliance(cfg_path, sim_port, 2.5)
    backlog = int(stats["outbox"]["pending"])  # type: ignore[index]
    assert backlog > 0, stats["outbox"]

    bundle = make_bundle(tmp_path, "1.1", key, script=BAD_SELFTEST)
    with pytest.raises(UpdateError, match="rolled back to 1.0"):
        update(bundle, device, restart=Restarts(), checks=[selftest_check(120)])
    assert device.current_release() == "1.0"

    broker_port = mosquitto.port  # type: ignore[attr-defined]
    received: list[str] = []
    got = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="update-test")

    def on_message(client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.topic)
        if len([t for t in received if not t.endswith("/status")]) >= backlog:
            got.set()

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker_port)
    sub.subscribe("edge/cell-up/#", qos=1)
    sub.loop_start()
    try:
        cfg_path = write_config(device, sim_port, broker_port)
        stats = run_appliance(cfg_path, sim_port, 3.0)
        assert got.wait(10), f"{len(received)} messages for a backlog of {backlog}"
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert stats["outbox"]["pending"] == 0, stats["outbox"]  # type: ignore[index]


def test_a_partial_folder_left_by_a_power_cut_is_replaced_by_the_next_update(
    tmp_path: Path, device: Layout, key: Ed25519PrivateKey
) -> None:
    stale = device.releases / ".1.1.partial"
    (stale / "venv/bin").mkdir(parents=True)
    (stale / "venv/bin/appliance").write_text("half written")
    update(make_bundle(tmp_path, "1.1", key), device, restart=None, checks=[])
    assert not stale.exists()
    assert (device.releases / "1.1/venv/bin/appliance").read_text() == GOOD


class ReadyHandler(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        code = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.send_response(code)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.mark.parametrize("answers, ok", [([503, 503, 200], True), ([503], False)])
def test_ready_url_waits_for_200_and_fails_with_the_last_answer(
    device: Layout, answers: list[int], ok: bool
) -> None:
    ReadyHandler.answers = list(answers)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReadyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check = ready_url_check(f"http://127.0.0.1:{server.server_port}/ready", timeout_s=4)
        if ok:
            check(device)
        else:
            with pytest.raises(UpdateError, match="not ready within 4 s .HTTP 503"):
                check(device)
    finally:
        server.shutdown()
        server.server_close()
