"""image/build: the overlay tarball, its sha256, signature and manifest, the venv that runs on
the target's system Python, the offline wheelhouse (amd64 built here; arm64's checked for
aarch64 / cp310 with pip's offline resolver)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from image_fixtures import *  # noqa: F403 (the amd64_image fixture)
from image_fixtures import BuiltImage, run_build

from appliance.update import Layout, inspect_bundle, verify_bundle

pytestmark = pytest.mark.slow

REL = "opt/appliance/releases/0.1.0-test"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_tarball_has_its_sha256_and_a_signature_that_appliance_update_accepts(
    amd64_image: BuiltImage,
) -> None:
    sha_line = (amd64_image.out / (amd64_image.tarball.name + ".sha256")).read_text()
    assert sha_line == f"{sha256(amd64_image.tarball)}  {amd64_image.tarball.name}\n"
    # The public key of --sign-key is in the overlay: the flashed device accepts its updates.
    keys = Layout(amd64_image.root).keys_dir
    assert verify_bundle(amd64_image.tarball, keys) == sha256(amd64_image.tarball)
    assert inspect_bundle(amd64_image.tarball)[0] == "0.1.0-test"


def test_the_overlay_holds_release_current_link_config_units_rules_and_state(
    amd64_image: BuiltImage,
) -> None:
    root = amd64_image.root
    assert os.readlink(root / "opt/appliance/current") == "releases/0.1.0-test"
    for path in (
        f"{REL}/venv/bin/appliance",
        f"{REL}/bin/appliance-firstboot",
        f"{REL}/manifest.json",
        "etc/appliance/appliance.toml",
        "etc/systemd/system/appliance.service",
        "etc/systemd/system/appliance-firstboot.service",
        "etc/systemd/journald.conf.d/appliance.conf",
        "etc/udev/rules.d/70-appliance-serial.rules",
        "usr/lib/sysusers.d/appliance.conf",
    ):
        assert (root / path).is_file(), path
    for unit in ("appliance.service", "appliance-firstboot.service"):
        link = root / "etc/systemd/system/multi-user.target.wants" / unit
        assert os.readlink(link) == f"../{unit}"  # enabled
    assert (root / "var/lib/appliance/engines").is_dir()
    assert not list((root / "var/lib/appliance").rglob("*.sqlite"))  # no state is shipped
    with tarfile.open(amd64_image.tarball) as tar:
        members = tar.getmembers()
    assert all(m.uid == 0 and m.gid == 0 for m in members)
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: Path(n).parts)  # a reproducible order


def test_the_manifest_names_every_version_with_hashes_that_match_the_files(
    amd64_image: BuiltImage,
) -> None:
    root = amd64_image.root
    manifest = json.loads((root / REL / "manifest.json").read_text())
    assert manifest == json.loads((amd64_image.out / "manifest.json").read_text())
    assert manifest["version"] == "0.1.0" and manifest["release"] == "0.1.0-test"
    assert manifest["target"]["python"] == amd64_image.python
    names = {w["name"] for w in manifest["wheels"]}
    assert {"cnc-edge-appliance", "numpy", "onnxruntime", "pymodbus", "paho-mqtt", "pyserial",
            "msgspec", "cryptography"} <= names  # fmt: skip
    for wheel in manifest["wheels"]:
        assert sha256(root / REL / "wheels" / wheel["file"]) == wheel["sha256"], wheel["file"]
    (model,) = [m for m in manifest["models"] if m["name"] == "cnc_anomaly"]
    repo_models = Path(__file__).resolve().parents[2] / "models" / "cnc_anomaly"
    assert model["files"]["model.onnx"] == sha256(repo_models / "model.onnx")
    assert model["version"] == json.loads((repo_models / "manifest.json").read_text())["version"]
    assert manifest["offline_resolution"].startswith("Would install ")


def test_the_release_venv_runs_on_the_system_python_and_checks_the_shipped_config(
    amd64_image: BuiltImage,
) -> None:
    venv = amd64_image.root / REL / "venv"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    assert os.readlink(venv / f"bin/python{amd64_image.python}") == (
        f"/usr/bin/python{amd64_image.python}"
    )
    # The entry point's shebang names the release's own interpreter on the device.
    assert (
        (venv / "bin/appliance")
        .read_text()
        .startswith(f"#!/{REL}/venv/bin/python{amd64_image.python}\n")
    )
    py = str(venv / "bin/python3")
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run(
        [py, "-c", "import sys, appliance; print(sys.prefix); print(appliance.__file__)"],
        capture_output=True, text=True, env=env, check=True, cwd=amd64_image.root,
    )  # fmt: skip
    prefix, module = out.stdout.split()
    assert prefix == str(venv) and module.startswith(str(venv / "lib"))
    cfg_file = amd64_image.root / "etc/appliance/appliance.toml"
    check = subprocess.run(
        [py, "-m", "appliance", "check-config", str(cfg_file)],
        capture_output=True, text=True, env=env, cwd=amd64_image.root,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout


def test_the_arm64_wheelhouse_resolves_every_dependency_offline_for_aarch64_cp310(
    tmp_path: Path,
) -> None:
    out = tmp_path / "arm64"
    proc = run_build("--arch", "arm64", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["python"] == "3.10"
    assert manifest["target"]["system_site_packages"] is True  # TensorRT from JetPack
    assert "tensorrt" in manifest["not_in_wheelhouse"] and "pycuda" in manifest["not_in_wheelhouse"]
    wheels = tmp_path / "wheels"
    with tarfile.open(out / "appliance-0.1.0-arm64.tar.gz") as tar:
        for m in tar.getmembers():
            if m.isfile() and "/wheels/" in m.name:
                f = tar.extractfile(m)
                assert f is not None
                dest = wheels / m.name.split("/wheels/", 1)[1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read())
    for wheel in manifest["wheels"]:
        assert wheel["file"].endswith(("-none-any.whl", "aarch64.whl")), wheel["file"]
    # Independently of the build's own check: pip's resolver, offline, for the Jetson.
    platforms = [a for m in range(35, 16, -1) for a in ("--platform", f"manylinux_2_{m}_aarch64")]
    check = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
         "--dry-run", "--ignore-installed", "--target", str(tmp_path / "t"), *platforms,
         "--platform", "manylinux2014_aarch64", "--python-version", "3.10",
         "--implementation", "cp", "--only-binary=:all:", "cnc-edge-appliance"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    plan = check.stdout
    for dep in ("numpy", "onnxruntime", "pymodbus", "paho-mqtt", "msgspec", "cryptography"):
        assert f" {dep}-" in plan, (dep, plan)
