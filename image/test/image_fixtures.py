"""Helpers for the image tests (imported by them: ``from image_fixtures import ...``): the image
Python so its venv runs here), signed with a key made for the session."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["BuiltImage", "amd64_image", "run_build", "system_python"]

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "image" / "build"


def system_python() -> str:
    """X.Y of /usr/bin/python3, the interpreter an image for this host's OS would use."""
    out = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@dataclass
class BuiltImage:
    out: Path
    tarball: Path
    key: Ed25519PrivateKey
    python: str
    root: Path  # the tarball unpacked
    stderr: str


def run_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD), *args], capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="session")
def amd64_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    work = tmp_path_factory.mktemp("image")
    key = Ed25519PrivateKey.generate()
    pem = work / "sign.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    python = system_python()
    out = work / "out"
    proc = run_build(
        "--arch", "amd64", "--out", str(out), "--python-version", python,
        "--sign-key", str(pem), "--release", "0.1.0-test",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tarball = out / "appliance-0.1.0-test-amd64.tar.gz"
    root = work / "root"
    root.mkdir()
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "tar_filter"):  # 3.10.12+, 3.11.4+: say it (3.14 warns otherwise)
            tar.extractall(root, filter="tar")
        else:
            tar.extractall(root)
    return BuiltImage(out, tarball, key, python, root, proc.stderr)
