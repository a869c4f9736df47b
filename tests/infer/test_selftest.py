"""`appliance selftest`: through the real CLI (a subprocess) on this CPU host, and the report's
handling of backends that fail (TEST DOUBLES of GPU backends: the real onnxruntime CPU engine
with one injected failure, since TensorRT and CUDA cannot run here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from appliance.config import BatchSection, Config
from appliance.infer.base import Engine
from appliance.infer.bundle import MODELS_DIR, ModelBundle
from appliance.infer.ort import OrtEngine
from appliance.infer.select import BackendUnavailable, EngineOptions
from appliance.infer.selftest import format_report, run_selftest

ROOT = Path(__file__).resolve().parents[2]


def selftest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "selftest", "--iterations", "20", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_selftest_passes_on_the_cpu_and_lists_absent_backends_with_their_reason(
    tmp_path: Path,
) -> None:
    out = tmp_path / "selftest.json"
    proc = selftest("--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    row = {ln.split()[1]: ln.split()[2] for ln in lines if ln.startswith("cnc_anomaly")}
    assert row == {
        "tensorrt": "ABSENT",
        "onnxruntime-tensorrt": "ABSENT",
        "onnxruntime-cuda": "ABSENT",
        "onnxruntime-cpu": "PASS",
    }
    assert "CUDAExecutionProvider" in proc.stdout  # the reason CUDA is absent
    assert "selftest PASS: 1 of 4" in proc.stdout
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["models"] == ["cnc_anomaly"]
    assert report["max_batch"] == 32  # the default [batch] max_batch
    by = {r["backend"]: r for r in report["results"]}
    assert by["tensorrt"]["status"] == "absent" and by["tensorrt"]["reason"]
    cpu = by["onnxruntime-cpu"]
    assert cpu["status"] == "pass" and cpu["reason"] == ""
    assert 0 <= cpu["parity_max_abs_err"] <= cpu["golden_atol"] == 1e-4
    assert [lat["batch"] for lat in cpu["latency"]] == [1, 32]
    for lat in cpu["latency"]:
        assert lat["iterations"] == 20
        assert 0 < lat["p50_us"] <= lat["p99_us"] and lat["rows_per_s"] > 0
    assert cpu["load_s"] > 0 and cpu["build_s"] is None


def test_selftest_fails_with_exit_1_when_the_configured_model_fails_parity_everywhere(
    tmp_path: Path,
) -> None:
    d = tmp_path / "bad_model"
    shutil.copytree(MODELS_DIR / "cnc_anomaly", d)
    with np.load(d / "golden.npz") as g:
        np.savez(d / "golden.npz", inputs=g["inputs"], outputs=g["outputs"] + 0.5)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[devices]]\nname = "cnc-1"\nprofile = "cnc-sim"\n[engine]\nmodel = "{d}"\n'
        "[batch]\nmax_batch = 64\n"
    )
    out = tmp_path / "r.json"
    proc = selftest("-c", str(cfg), "--json", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "selftest FAIL: 0 of 4" in proc.stdout and "parity" in proc.stdout
    cpu = {r["backend"]: r for r in json.loads(out.read_text())["results"]}["onnxruntime-cpu"]
    assert cpu["status"] == "fail" and "golden-vector parity" in cpu["reason"]
    assert abs(cpu["parity_max_abs_err"] - 0.5) < 1e-3  # by how much it missed


def test_selftest_of_a_missing_model_is_exit_1_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[devices]]\nname = "cnc-1"\nprofile = "cnc-sim"\n[engine]\nmodel = "{tmp_path}/nope"\n'
    )
    proc = selftest("-c", str(cfg))
    assert proc.returncode == 1
    assert "model error:" in proc.stdout and "nope" in proc.stdout


class RaisingDouble(OrtEngine):
    """Test double: loads and passes parity, then raises on the timed calls (a CUDA error)."""

    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if len(batch) != len(self.bundle.golden_inputs):
            raise RuntimeError("CUDA error (test double)")
        return super()._infer_impl(batch)


def test_every_backend_in_the_table_is_checked_and_one_failing_does_not_stop_the_others() -> None:
    def absent(bundle: ModelBundle, opts: EngineOptions) -> Engine:
        raise BackendUnavailable("no GPU (test double)")

    def raising(bundle: ModelBundle, opts: EngineOptions) -> Engine:
        return RaisingDouble(bundle, providers=["CPUExecutionProvider"])

    def cpu(bundle: ModelBundle, opts: EngineOptions) -> Engine:
        return OrtEngine(bundle, providers=["CPUExecutionProvider"], max_batch=opts.max_batch)

    factories = {"gpu": absent, "cuda": raising, "cpu": cpu}
    report = run_selftest(
        ["cnc_anomaly"],
        Config(batch=BatchSection(max_batch=8)),
        iterations=5,
        factories=factories,
    )
    assert [(r["backend"], r["status"]) for r in report["results"]] == [
        ("gpu", "absent"),
        ("cuda", "fail"),
        ("cpu", "pass"),
    ]
    assert report["passed"] is True
    cuda = report["results"][1]
    assert "CUDA error" in cuda["reason"] and cuda["parity_max_abs_err"] is not None
    text = format_report(report)
    assert "no GPU (test double)" in text and "CUDA error (test double)" in text
