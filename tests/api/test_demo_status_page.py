"""`appliance demo` serves the status page and prints its URL (the README points at it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_prints_the_status_page_url_and_the_page_answers() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "demo", "--duration", "8", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            m = re.match(r"status page: (http://127\.0\.0\.1:\d+/)$", line.strip())
            if m:
                url = m.group(1)
                break
        assert url is not None, "the demo printed no status page URL"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200 and b"<title>" in resp.read()
        with urllib.request.urlopen(url + "api/v1/status", timeout=5) as resp:
            status = json.loads(resp.read())
        assert status["appliance"]["id"] == "demo-cell"
        assert [d["name"] for d in status["devices"]] == ["cnc-1", "cnc-2", "cnc-3", "cnc-4"]
    finally:
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
