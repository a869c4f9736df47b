"""The `[engine]` config keys, the golden tolerances, onnxruntime devices and `appliance engine`.

Everything here runs real onnxruntime (CPU); the TensorRT parts use the fake (a TEST DOUBLE in
tests/infer/fake_tensorrt)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from engine_fixtures import *  # noqa: F403 (the fake_trt and make_model fixtures)

from appliance.cli import main
from appliance.config import load_config
from appliance.errors import ConfigError, ModelError
from appliance.infer.bundle import load_bundle
from appliance.infer.cache import list_cache
from appliance.infer.ort import OrtEngine


def write_config(tmp_path: Path, engine: str = "", batch: str = "") -> Path:
    p = tmp_path / "appliance.toml"
    p.write_text(
        '[[devices]]\nname = "m"\nprofile = "cnc-sim"\n'
        + (f"[batch]\n{batch}\n" if batch else "")
        + f"[engine]\n{engine}\n"
    )
    return p


# -- config ----------------------------------------------------------------------------------
def test_engine_keys_have_defaults() -> None:
    from appliance.config import EngineSection

    e = EngineSection()
    assert (e.backend, e.cache_dir, e.precision, e.workspace_mb) == (
        "auto",
        "/var/lib/appliance/engines",
        "auto",
        1024,
    )


@pytest.mark.parametrize("backend", ["auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"])
def test_every_backend_name_is_accepted(tmp_path: Path, backend: str) -> None:
    cfg = load_config(write_config(tmp_path, f'backend = "{backend}"'))
    assert cfg.engine.backend == backend


def test_relative_cache_dir_resolves_against_the_config_directory(tmp_path: Path) -> None:
    cfg = load_config(
        write_config(tmp_path, 'cache_dir = "engines"\nprecision = "fp16"\nworkspace_mb = 256')
    )
    assert cfg.engine.cache_dir == str(tmp_path.resolve() / "engines")
    assert (cfg.engine.precision, cfg.engine.workspace_mb) == ("fp16", 256)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('backend = "tensorrt-fast"', "engine.backend"),
        ('precision = "int8"', "engine.precision"),
        ("workspace_mb = 0", "engine.workspace_mb"),
    ],
)
def test_bad_engine_keys_name_the_key_path(tmp_path: Path, line: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=rf"appliance.toml: {re.escape(needle)}: "):
        load_config(write_config(tmp_path, line))


# -- golden tolerances -----------------------------------------------------------------------
def scaled_golden(d: Path, factor: float) -> None:
    with np.load(d / "golden.npz") as g:
        np.savez(d / "golden.npz", inputs=g["inputs"], outputs=g["outputs"] * factor)


def test_relative_tolerance_admits_a_proportional_error(make_model: Callable[..., Path]) -> None:
    d = make_model(golden_atol=1e-6, golden_rtol=2e-3)
    scaled_golden(d, 1.001)  # 0.1 % off everywhere: within rtol, far beyond atol
    engine = OrtEngine(load_bundle(str(d)), device="cpu")
    engine.start()
    assert engine.check_parity() > 1e-6
    engine.close()


def test_without_rtol_the_same_error_fails_naming_both_tolerances(
    make_model: Callable[..., Path],
) -> None:
    d = make_model(golden_atol=1e-6)
    scaled_golden(d, 1.001)
    engine = OrtEngine(load_bundle(str(d)), device="cpu")
    with pytest.raises(ModelError) as err:
        engine.start()
    msg = str(err.value)
    assert msg.startswith("onnxruntime-cpu: model cnc_anomaly 1.0.0 fails its golden-vector")
    assert "output 'score'" in msg and "atol 1e-06 + rtol 0" in msg and "element " in msg


def test_a_nan_output_never_passes_parity(make_model: Callable[..., Path]) -> None:
    d = make_model(golden_atol=1e9, golden_rtol=1e9)
    with np.load(d / "golden.npz") as g:
        out = g["outputs"].copy()
        out[3] = np.nan
        np.savez(d / "golden.npz", inputs=g["inputs"], outputs=out)
    with pytest.raises(ModelError, match="element 3"):
        OrtEngine(load_bundle(str(d)), device="cpu").start()


@pytest.mark.parametrize(
    ("key", "value"), [("golden_rtol", -1), ("golden_atol", "x"), ("fp16", "yes")]
)
def test_bad_tolerance_or_fp16_in_the_manifest_is_refused(
    make_model: Callable[..., Path], key: str, value: object
) -> None:
    with pytest.raises(ModelError, match="manifest.json: missing or invalid field"):
        load_bundle(str(make_model(**{key: value})))


# -- onnxruntime devices ---------------------------------------------------------------------
def test_cpu_device_is_the_onnxruntime_cpu_backend() -> None:
    engine = OrtEngine(load_bundle("cnc_anomaly"), device="cpu")
    assert engine.backend == "onnxruntime-cpu" and engine.unavailable_reason() is None
    engine.start()
    assert engine.detail == "CPUExecutionProvider"
    engine.close()


@pytest.mark.parametrize(
    ("device", "backend", "provider"),
    [
        ("cuda", "onnxruntime-cuda", "CUDAExecutionProvider"),
        ("tensorrt-ep", "onnxruntime-tensorrt", "TensorrtExecutionProvider"),
    ],
)
def test_gpu_devices_say_which_provider_is_missing(
    device: str, backend: str, provider: str
) -> None:
    import onnxruntime as ort

    if provider in ort.get_available_providers():
        pytest.fail(f"this test expects a CPU-only onnxruntime; {provider} is present")
    engine = OrtEngine(load_bundle("cnc_anomaly"), device=device)
    assert engine.backend == backend
    reason = engine.unavailable_reason()
    assert reason is not None and reason.startswith(f"onnxruntime has no {provider}")
    with pytest.raises(ModelError, match=f"{backend} backend unavailable"):
        engine.start()


def test_tensorrt_ep_cache_folder_follows_the_key(fake_trt: ModuleType, tmp_path: Path) -> None:
    bundle = load_bundle("cnc_anomaly")

    def options(**kw: object) -> dict[str, str]:
        engine = OrtEngine(bundle, device="tensorrt-ep", cache_dir=tmp_path, **kw)  # type: ignore[arg-type]
        return engine.trt_ep_options()

    base = options(max_batch=256, opt_batch=32)
    assert base["trt_profile_min_shapes"] == "features:1x16"
    assert base["trt_profile_opt_shapes"] == "features:32x16"
    assert base["trt_profile_max_shapes"] == "features:256x16"
    assert base["trt_engine_cache_enable"] == base["trt_timing_cache_enable"] == "True"
    assert base["trt_fp16_enable"] == "False"
    folder = Path(base["trt_engine_cache_path"])
    assert folder.is_dir() and folder.parent == tmp_path / "ort-trt"
    assert options(max_batch=256, opt_batch=32)["trt_engine_cache_path"] == str(folder)
    assert options(max_batch=512, opt_batch=32)["trt_engine_cache_path"] != str(folder)
    fake_trt.__version__ = "10.9.0"
    assert options(max_batch=256, opt_batch=32)["trt_engine_cache_path"] != str(folder)
    rows = list_cache(tmp_path)
    assert len(rows) == 3 and {r["kind"] for r in rows} == {"ort-trt"}


def test_legacy_provider_list_still_picks_the_device() -> None:
    bundle = load_bundle("cnc_anomaly")
    assert OrtEngine(bundle, providers=["CPUExecutionProvider"]).backend == "onnxruntime-cpu"
    cuda = OrtEngine(bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cuda.backend == "onnxruntime-cuda"


# -- appliance engine build | list -----------------------------------------------------------
def test_engine_build_without_tensorrt_exits_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, 'cache_dir = "engines"')
    assert main(["engine", "build", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "tensorrt: not available here: tensorrt not installed" in err
    assert "Traceback" not in err


def test_engine_build_then_list_with_the_fake(
    fake_trt: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, 'cache_dir = "engines"\nworkspace_mb = 64', "max_batch = 128")
    assert main(["engine", "build", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "cnc_anomaly: tensorrt fp32 key " in out and "building… done in " in out
    assert "parity OK" in out
    assert main(["engine", "build", "-c", str(cfg)]) == 0
    assert "cached" in capsys.readouterr().out and len(fake_trt.FAKE.builds) == 1
    assert fake_trt.FAKE.builds[0]["workspace"] == 64 << 20
    assert fake_trt.FAKE.builds[0]["profile"]["features"][2] == [128, 16]

    assert main(["engine", "list", "-c", str(cfg), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["cache_dir"] == str(tmp_path.resolve() / "engines")
    (row,) = listing["engines"]
    assert row["state"] == "ok" and row["precision"] == "fp32" and row["size"] > 0
    assert main(["engine", "list", "-c", str(cfg)]) == 0
    table = capsys.readouterr().out
    assert row["key16"] in table and "Fake Orin (test double) (8.7)" in table


def test_engine_build_with_an_unwritable_cache_dir_exits_1_naming_it(
    fake_trt: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    cfg = write_config(tmp_path, 'cache_dir = "file/engines"')
    assert main(["engine", "build", "-c", str(cfg)]) == 1
    assert f"engine cache dir {tmp_path.resolve() / 'file' / 'engines'}" in (
        capsys.readouterr().err
    )


def test_engine_build_for_the_cpu_backend_loads_and_checks_parity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    assert main(["engine", "build", "-c", str(cfg), "--backend", "onnxruntime-cpu"]) == 0
    assert "parity OK (onnxruntime-cpu: CPUExecutionProvider)" in capsys.readouterr().out
