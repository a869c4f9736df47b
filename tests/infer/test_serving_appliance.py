"""`Appliance` (the real supervisor, a simulated cell, a real Mosquitto) serves on the next
backend when the first one of the chain fails its golden parity check.

The failing backend is a TEST DOUBLE registered under the name ``tensorrt`` in the factory table
(TensorRT cannot run here): the real onnxruntime CPU engine with its outputs shifted by 0.5, as
a miscompiled engine would produce.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from appliance.config import parse_config
from appliance.demo.mosquitto import MosquittoProcess, free_port
from appliance.errors import ConfigError
from appliance.infer import select
from appliance.infer.base import Engine
from appliance.infer.bundle import ModelBundle
from appliance.infer.ort import OrtEngine
from appliance.runtime import Appliance
from appliance.simulate.cell import SimulatedCell

pytestmark = pytest.mark.slow


class WrongParityTensorRtDouble(OrtEngine):
    """Test double standing in for a TensorRT engine whose numbers are off."""

    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return super()._infer_impl(batch) + np.float32(0.5)


def wrong_parity_tensorrt(bundle: ModelBundle, opts: select.EngineOptions) -> Engine:
    return WrongParityTensorRtDouble(bundle, providers=["CPUExecutionProvider"])


def test_appliance_serves_on_the_next_backend_when_the_first_fails_its_golden_check(
    tmp_path: Path, mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(select.FACTORIES, "tensorrt", wrong_parity_tensorrt)
    port = free_port()
    cell = SimulatedCell(machines=1, ports=[port], seed=3)
    cfg = parse_config(
        {
            "appliance": {"id": "fallback"},
            "devices": [{"name": "cnc-1", "port": port, "profile": "cnc-sim"}],
            "features": {"window_s": 1.0},
            "batch": {"max_delay_ms": 5},
            "outbox": {"path": "outbox.sqlite"},
            "mqtt": {"port": mosquitto.port},
        },
        source="t",
        base_dir=tmp_path,
    )
    app = Appliance(cfg)

    async def go() -> dict[str, Any]:
        await cell.start()
        await app.start()
        try:
            deadline = time.monotonic() + 20
            while app.batcher.rows_scored < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await app.stop()
            await cell.stop()
        return app.stats()

    stats = asyncio.run(go())
    eng = stats["engine"]
    assert eng["backend"] == "onnxruntime-cpu"
    assert stats["batcher"]["rows_scored"] >= 2 and stats["batcher"]["errors"] == 0
    assert [(c["backend"], c["state"]) for c in eng["chain"]] == [
        ("tensorrt", "failed"),
        ("onnxruntime-cuda", "absent"),
        ("onnxruntime-cpu", "serving"),
    ]
    assert "parity" in eng["chain"][0]["reason"]


def absent_cpu(bundle: ModelBundle, opts: select.EngineOptions) -> Engine:
    raise select.BackendUnavailable("onnxruntime is not installed (test double)")


def test_a_forced_backend_that_is_absent_stops_the_appliance_at_start_naming_it(
    tmp_path: Path, mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fallback for a forced backend: a ConfigError (exit 2 from the CLI) naming it and why,
    and a clean stop of what had started (outbox, uplink)."""
    monkeypatch.setitem(select.FACTORIES, "onnxruntime-cpu", absent_cpu)
    cfg = parse_config(
        {
            "devices": [{"name": "cnc-1", "port": free_port(), "profile": "cnc-sim"}],
            "engine": {"backend": "onnxruntime-cpu"},
            "outbox": {"path": "outbox.sqlite"},
            "mqtt": {"port": mosquitto.port},
        },
        source="t",
        base_dir=tmp_path,
    )
    app = Appliance(cfg)
    with pytest.raises(ConfigError, match="engine.backend = 'onnxruntime-cpu': onnxruntime is not"):
        asyncio.run(app.run_until_signal(5.0))
    assert app.stats()["engine"]["chain"] == [
        {
            "backend": "onnxruntime-cpu",
            "state": "absent",
            "reason": "onnxruntime is not installed (test double)",
        }
    ]
