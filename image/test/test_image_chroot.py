"""The image test (slow; run by ``image/test-chroot``, which ``.ci/run`` calls after the suite):
the amd64 overlay built by image/build, installed into a minimal Debian 12 root made with
debootstrap, then inside that root (chroot, as the ``appliance`` user the overlay creates):
``appliance selftest``, a short ``appliance run`` polling the simulator and publishing to a
Mosquitto broker outside the root, and an ``appliance update`` to a second signed release.

The debootstrap root is cached as a tarball in ``$APPLIANCE_IMAGE_CACHE`` (default
``/var/cache/appliance-image-test``), so only the first run on a machine downloads Debian.
Needs root (chroot), debootstrap, network access to Debian's and PyPI's archives the first time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.demo.mosquitto import MosquittoProcess, free_port, mosquitto_binary, wait_port

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = os.environ.get("APPLIANCE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("APPLIANCE_IMAGE_CACHE", "/var/cache/appliance-image-test"))


def debootstrap_tarball() -> Path:
    """A minimal Debian root with python3 as a tarball, made once per machine."""
    cached = CACHE / f"{SUITE}-amd64-minbase-python3.tar"
    if cached.exists():
        return cached
    exe = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(exe):
        pytest.fail("debootstrap is missing: apt-get install -y debootstrap (test-chroot does)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / "debootstrap.partial"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(
        [exe, "--variant=minbase", "--include=python3", SUITE, str(work), MIRROR],
        check=True, stdout=subprocess.DEVNULL, timeout=1800,
    )  # fmt: skip
    shutil.rmtree(work / "var/cache/apt/archives", ignore_errors=True)
    partial = cached.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(work), "-cf", str(partial), "."], check=True)
    os.replace(partial, cached)
    shutil.rmtree(work)
    return cached


def chroot(root: Path, *cmd: str, user: str | None = "appliance", timeout: float = 300,
           **kw: object) -> subprocess.CompletedProcess[str]:  # fmt: skip
    spec = [f"--userspec={user}:{user}"] if user else []
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/var/lib/appliance", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["chroot", *spec, str(root), *cmd],
        capture_output=True, text=True, env=env, timeout=timeout, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def build(out: Path, pem: Path, release: str, python: str) -> Path:
    proc = subprocess.run(
        [sys.executable, str(REPO / "image/build"), "--arch", "amd64", "--out", str(out),
         "--python-version", python, "--sign-key", str(pem), "--release", release],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / f"appliance-{release}-amd64.tar.gz"


@dataclass
class Device:
    root: Path
    work: Path
    pem: Path
    python: str


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    if os.geteuid() != 0:
        pytest.fail("the image test needs root (chroot); CI runs as root")
    work = tmp_path_factory.mktemp("chroot")
    root = work / "root"
    root.mkdir()
    t0 = time.monotonic()
    subprocess.run(["tar", "-C", str(root), "-xf", str(debootstrap_tarball())], check=True)
    print(f"debian root ready in {time.monotonic() - t0:.0f} s")
    python = next(p.name for p in sorted((root / "usr/bin").glob("python3.*"))
                  if p.name[len("python"):].replace(".", "").isdigit())[len("python"):]  # fmt: skip
    key = Ed25519PrivateKey.generate()
    pem = work / "sign.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tarball = build(work / "dist1", pem, "0.1.0-a", python)
    subprocess.run(
        ["tar", "-xzpf", str(tarball), "-C", str(root), "--numeric-owner",
         "--keep-directory-symlink"], check=True,
    )  # fmt: skip
    # What systemd does on the device: sysusers creates the user; StateDirectory= owns the state.
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(root / "usr/lib/sysusers.d/appliance.conf")],
        check=True,
    )
    assert chroot(root, "chown", "-R", "appliance:appliance", "/var/lib/appliance",
                  user=None).returncode == 0  # fmt: skip
    for mount in ("proc", "dev"):
        subprocess.run(["mount", "--bind", f"/{mount}", str(root / mount)], check=True)
    try:
        yield Device(root, work, pem, python)
    finally:
        for mount in ("dev", "proc"):
            subprocess.run(["umount", "-l", str(root / mount)], check=False)


def test_the_release_venv_is_the_systems_python_and_the_service_user_exists(
    device: Device,
) -> None:
    proc = chroot(device.root, "/opt/appliance/current/venv/bin/appliance", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == "appliance 0.1.0", proc.stderr
    proc = chroot(device.root, "id", "appliance", user=None)
    assert "dialout" in proc.stdout and "video" in proc.stdout


def test_selftest_passes_inside_the_image(device: Device) -> None:
    proc = chroot(
        device.root, "/opt/appliance/current/venv/bin/appliance", "selftest",
        "--iterations", "20", "--json", "/var/lib/appliance/selftest.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((device.root / "var/lib/appliance/selftest.json").read_text())
    assert report["passed"] is True


def test_a_short_run_polls_the_simulator_and_publishes_to_a_broker_outside_the_root(
    device: Device,
) -> None:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed (tests/run installs it)")
    broker = MosquittoProcess(port=free_port(), workdir=device.work / "mosquitto")
    sim_port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "appliance", "simulate", "--machines", "1", "--host", "127.0.0.1",
         "--base-port", str(sim_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    cfg = device.root / "etc/appliance/appliance.toml"
    shipped = cfg.read_text()
    cfg.write_text(
        f"""[appliance]
id = "chroot-cell"
[[devices]]
name = "cnc-1"
host = "127.0.0.1"
port = {sim_port}
profile = "cnc-sim"
[outbox]
path = "/var/lib/appliance/outbox.sqlite"
[engine]
model = "cnc_anomaly"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
tls = false
"""
    )
    received: list[str] = []
    done = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chroot-test")

    def on_message(client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.topic)
        if sum("/telemetry/" in t for t in received) >= 3:
            done.set()

    sub.on_message = on_message
    broker.start()
    try:
        wait_port(sim_port, 10)
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe("edge/chroot-cell/#", qos=1)
        sub.loop_start()
        proc = chroot(
            device.root, "/opt/appliance/current/venv/bin/appliance", "run",
            "-c", "/etc/appliance/appliance.toml", "--duration", "6", timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert done.wait(5), received
        assert "edge/chroot-cell/telemetry/cnc-1" in received
        assert (device.root / "var/lib/appliance/outbox.sqlite").stat().st_uid != 0
    finally:
        sub.loop_stop()
        sub.disconnect()
        sim.terminate()
        sim.wait(10)
        broker.stop()
        cfg.write_text(shipped)


def test_appliance_update_inside_the_image_switches_to_a_second_signed_release(
    device: Device,
) -> None:
    tarball = build(device.work / "dist2", device.pem, "0.1.0-b", device.python)
    dest = device.root / "tmp" / tarball.name
    for suffix in ("", ".sha256", ".sig"):
        shutil.copy(str(tarball) + suffix, str(dest) + suffix)
    proc = chroot(
        device.root, "/opt/appliance/current/venv/bin/appliance", "update",
        f"/tmp/{tarball.name}", "--no-restart", "--timeout-s", "300", user=None, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.readlink(device.root / "opt/appliance/current") == "releases/0.1.0-b"
    assert os.readlink(device.root / "opt/appliance/previous") == "releases/0.1.0-a"
    proc = chroot(device.root, "/opt/appliance/current/venv/bin/appliance", "--version")
    assert proc.returncode == 0
