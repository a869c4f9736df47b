"""Helpers for the text-protocol tests: a real socat pty pair, and bounded waits.

Not a conftest.py on purpose: the suite's root conftest is imported as ``conftest`` by other test
modules, and a second non-package conftest would shadow it in ``sys.modules``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def socat_pair(tmp_path: Path, timeout_s: float = 5.0) -> Iterator[tuple[str, str]]:
    """A connected pair of pseudo-terminals (raw, no echo) made by ``socat``: yields their
    link paths ``(a, b)``; bytes written to one are read from the other."""
    with socat_process(tmp_path, timeout_s) as (a, b, _proc):
        yield a, b


@contextmanager
def socat_process(
    tmp_path: Path, timeout_s: float = 5.0
) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """Like :func:`socat_pair`, also yielding the socat process (to make the link vanish)."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed: run `apt-get install -y socat` (.ci/run does)")
    a, b = tmp_path / "pty-a", tmp_path / "pty-b"
    proc = subprocess.Popen(
        [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not (a.exists() and b.exists()):
            if proc.poll() is not None:
                pytest.fail(f"socat exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                pytest.fail(f"socat made no pty links within {timeout_s} s")
            time.sleep(0.01)
        yield str(a), str(b), proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - socat ignores SIGTERM
            proc.kill()
            proc.wait()


async def wait_until(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Poll ``cond`` every 5 ms until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.005)
