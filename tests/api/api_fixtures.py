"""A running appliance with its local API, fed by a simulated cell and publishing to a real
Mosquitto broker, in a background thread with its own event loop (shared by a test module)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from cellhelp import OVERTEMP, cell_config

from appliance.config import Config
from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.runtime import Appliance
from appliance.simulate.cell import SimulatedCell

T = TypeVar("T")
TOKEN = "s3cret-token-for-tests"


def make_config(tmp_path: Path, ports: list[int], mqtt_port: int, api_port: int) -> Config:
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    return cell_config(
        tmp_path,
        "api-test",
        ports,
        mqtt_port,
        device={"timeout_s": 0.5},
        # clear_below 30: stays raised once raised, tests read it at leisure
        alerts={"rules": [{**OVERTEMP, "clear_below": 30.0}]},
        api={
            "enabled": True,
            "port": api_port,
            "token_file": "api-token",
            "max_body_bytes": 4096,
            "history_s": 120,
        },
    )


class RunningCell:
    """Simulated cell (2 machines, 3x time) → appliance (API on) → Mosquitto."""

    def __init__(self, tmp_path: Path) -> None:
        self.broker = MosquittoProcess(port=free_port(), workdir=tmp_path / "mosquitto")
        ports = [free_port(), free_port()]
        self.cell = SimulatedCell(machines=2, ports=ports, seed=11, time_scale=3.0)
        self.api_port = free_port()
        self.cfg = make_config(tmp_path, ports, self.broker.port, self.api_port)
        self.app = Appliance(self.cfg)
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="appliance-loop")

    def start(self) -> None:
        self.broker.start()
        self._thread.start()
        self.run(self.cell.start())
        self.run(self.app.start())

    def stop(self) -> None:
        try:
            self.run(self.app.stop(drain_timeout_s=2.0))
            self.run(self.cell.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            self.broker.stop()

    def __enter__(self) -> RunningCell:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, *, scored: bool = False) -> None:
        """Wait (30 s at most) until 4 windows closed, the uplink is connected and, with
        ``scored``, the engine scored rows."""
        self.wait_for(
            lambda: (
                self.call(lambda: self.app.windows.windows_closed) >= 4
                and (not scored or self.call(lambda: self.app.engine.stats()["rows"]) > 0)
                and self.call(lambda: self.app.uplink.connected)
            ),
            30,
            "windows" + (" scored" if scored else "") + " and the uplink connected",
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        """Run ``coro`` on the appliance's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the appliance's loop (the stages are not thread-safe)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def get_json(self, path: str, expect: int = 200) -> Any:
        status, _, body = self.request(path)
        assert status == expect, (path, status, body[:500])
        return json.loads(body)

    def wait_for(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.1)
