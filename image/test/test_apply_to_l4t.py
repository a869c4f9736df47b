"""image/apply-to-l4t: the overlay into an L4T-like root filesystem before flash.sh (the amd64
image stands in for the arm64 one: the script does not run anything from the overlay)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from image_fixtures import *  # noqa: F403 (the amd64_image fixture)
from image_fixtures import BuiltImage

pytestmark = pytest.mark.slow

APPLY = Path(__file__).resolve().parents[2] / "image" / "apply-to-l4t"


def l4t_tree(tmp_path: Path, python: str) -> Path:
    """Linux_for_Tegra with flash.sh and a rootfs with merged /usr and the target's Python."""
    bsp = tmp_path / "Linux_for_Tegra"
    rootfs = bsp / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "usr/lib").mkdir()
    (rootfs / "lib").symlink_to("usr/lib")
    (rootfs / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    (rootfs / f"usr/bin/python{python}").write_text("")
    (bsp / "flash.sh").write_text("#!/bin/sh\n")
    return bsp


def apply(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(APPLY), *args], capture_output=True, text=True, timeout=300)


def test_the_overlay_lands_in_the_rootfs_keeping_its_directory_symlinks(
    tmp_path: Path, amd64_image: BuiltImage
) -> None:
    bsp = l4t_tree(tmp_path, amd64_image.python)
    plant = tmp_path / "plant.toml"
    plant.write_text("# the plant's config\n")
    proc = apply("--config", str(plant), str(amd64_image.tarball), str(bsp))
    assert proc.returncode == 0, proc.stderr
    rootfs = bsp / "rootfs"
    assert os.readlink(rootfs / "opt/appliance/current") == "releases/0.1.0-test"
    assert (rootfs / "etc/systemd/system/multi-user.target.wants/appliance.service").is_symlink()
    assert (rootfs / "etc/appliance/appliance.toml").read_text() == "# the plant's config\n"
    assert (rootfs / "lib").is_symlink()  # not replaced by a folder
    assert (rootfs / "opt/appliance/releases/0.1.0-test/venv/bin/appliance").stat().st_uid == 0
    if shutil.which("systemd-sysusers"):
        assert "appliance:" in (rootfs / "etc/passwd").read_text()
    assert "flash.sh" in proc.stdout


def test_a_tarball_whose_sha256_does_not_match_is_refused_before_anything_is_written(
    tmp_path: Path, amd64_image: BuiltImage
) -> None:
    bsp = l4t_tree(tmp_path, amd64_image.python)
    bad = tmp_path / amd64_image.tarball.name
    shutil.copy(amd64_image.tarball, bad)
    (tmp_path / (bad.name + ".sha256")).write_text(f"{'0' * 64}  {bad.name}\n")
    proc = apply(str(bad), str(bsp))
    assert proc.returncode == 1 and "does not match" in proc.stderr
    assert not (bsp / "rootfs/opt").exists()


def test_a_rootfs_without_the_images_python_is_refused(
    tmp_path: Path, amd64_image: BuiltImage
) -> None:
    bsp = l4t_tree(tmp_path, "3.99")
    proc = apply(str(amd64_image.tarball), str(bsp / "rootfs"))
    assert proc.returncode == 1 and f"no /usr/bin/python{amd64_image.python}" in proc.stderr
    assert not (bsp / "rootfs/opt").exists()
