"""The TensorRT backend and its engine cache, against the fake ``tensorrt``/``pycuda`` (a TEST
DOUBLE: tests/infer/fake_tensorrt). The cache files, locks, processes and onnxruntime are real."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from engine_fixtures import *  # noqa: F403 (the fake_trt and make_model fixtures)

from appliance.errors import ModelError
from appliance.infer.bundle import ModelBundle, load_bundle
from appliance.infer.cache import CacheKey, EngineCache, list_cache
from appliance.infer.trt import TrtEngine, trt_unavailable_reason

REPO = Path(__file__).resolve().parents[2]
FAKE_DIR = Path(__file__).parent / "fake_tensorrt"


def make_engine(cache_dir: Path, bundle: ModelBundle | None = None, **kw: object) -> TrtEngine:
    return TrtEngine(bundle or load_bundle("cnc_anomaly"), cache_dir=cache_dir, **kw)  # type: ignore[arg-type]


def cpu_scores(bundle: ModelBundle, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(s.run([bundle.output_name], {bundle.input_name: x})[0]).reshape(-1)


BASE_KEY = CacheKey(
    model="m",
    onnx_sha256="a" * 64,
    trt_version="10.3.0",
    gpu_name="Orin",
    compute_capability="8.7",
    precision="fp32",
    profile=(("features", (1, 16), (32, 16), (256, 16)),),
    builder_flags=("workspace_mb=1024",),
)


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "b" * 64},
        {"trt_version": "10.4.0"},
        {"gpu_name": "Orin Nano"},
        {"compute_capability": "8.6"},
        {"precision": "fp16"},
        {"profile": (("features", (1, 16), (64, 16), (256, 16)),)},
        {"profile": (("features", (1, 16), (32, 16), (512, 16)),)},
        {"builder_flags": ("workspace_mb=512",)},
        {"model": "other"},
    ],
)
def test_cache_key_changes_with_each_key_field(change: dict[str, object]) -> None:
    changed = dataclasses.replace(BASE_KEY, **change)  # type: ignore[arg-type]
    assert changed.digest != BASE_KEY.digest
    assert changed.stem != BASE_KEY.stem
    assert dataclasses.replace(BASE_KEY).digest == BASE_KEY.digest  # deterministic


def test_without_tensorrt_the_backend_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a host without TensorRT
    assert trt_unavailable_reason() == "tensorrt not installed"
    engine = make_engine(Path("/nonexistent"))
    assert engine.unavailable_reason() == "tensorrt not installed"
    assert engine.needs_build() is False
    with pytest.raises(ModelError, match="tensorrt not installed"):
        engine.start()


def test_no_cuda_device_is_an_unavailable_reason(
    fake_trt: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pycuda.driver as drv

    monkeypatch.setattr(drv.FAKE, "devices", 0)
    assert trt_unavailable_reason() == "no CUDA device"


def test_engine_is_built_once_then_loaded_from_the_cache(
    fake_trt: ModuleType, tmp_path: Path
) -> None:
    bundle = load_bundle("cnc_anomaly")
    first = make_engine(tmp_path, bundle, max_batch=256, opt_batch=32)
    assert first.needs_build()
    first.start()  # builds, then passes the golden parity check
    assert first.status == "built" and len(fake_trt.FAKE.builds) == 1
    x = np.random.default_rng(1).normal(size=(100, 16)).astype(np.float32)
    np.testing.assert_allclose(first.infer(x), cpu_scores(bundle, x), rtol=1e-6, atol=1e-6)
    first.close()

    key = first.key()
    meta = json.loads((tmp_path / f"{key.stem}.json").read_text())
    assert meta["key"] == key.digest and meta["fields"] == key.fields()
    assert meta["size"] == (tmp_path / f"{key.stem}.engine").stat().st_size
    assert meta["build_s"] >= 0 and meta["created"] > 0
    assert (tmp_path / "timing").is_dir()

    second = make_engine(tmp_path, bundle, max_batch=256, opt_batch=32)
    assert not second.needs_build()
    second.start()
    assert second.status == "cached" and len(fake_trt.FAKE.builds) == 1
    assert second.cache.stats.hits == 1 and second.cache.stats.builds == 0
    np.testing.assert_allclose(second.infer(x[:1]), cpu_scores(bundle, x[:1]), rtol=1e-6)
    second.close()
    second.close()  # idempotent

    (row,) = list_cache(tmp_path)
    assert row["key16"] == key.digest[:16] and row["state"] == "ok"
    assert row["size"] == meta["size"] and row["model"] == "cnc_anomaly"


def test_a_classifier_engine_is_built_with_only_its_served_output(
    fake_trt: ModuleType, tmp_path: Path
) -> None:
    bundle = load_bundle("cnc_spectrogram")  # outputs score and class_probs
    engine = make_engine(tmp_path, bundle, max_batch=64, opt_batch=8)
    engine.start()  # builds, then passes the golden parity check
    assert fake_trt.FAKE.builds[-1]["outputs"] == ["score"]
    x = bundle.golden_inputs
    np.testing.assert_allclose(engine.infer(x), cpu_scores(bundle, x), rtol=1e-5, atol=1e-6)
    engine.close()


@pytest.mark.parametrize("name", ["cnc_drift", "cnc_wear"])
def test_a_self_baseline_models_golden_sequence_passes_on_the_tensorrt_engine_and_fails_if_changed(
    fake_trt: ModuleType, tmp_path: Path, name: str
) -> None:
    """The golden *sequence* (one machine's rows through a fresh self-baseline stage, then the
    engine) is checked by every backend's start, TensorRT's included, in batches of the
    engine's max batch (serving's: at least the golden set, appliance/infer/select.py)."""
    bundle = load_bundle(name)
    assert bundle.drift is not None and bundle.sequence_inputs is not None
    assert bundle.sequence_outputs is not None
    n = len(bundle.golden_inputs)
    assert len(bundle.sequence_inputs) > n  # the sequence runs in several batches
    engine = make_engine(tmp_path / "ok", bundle, max_batch=n, opt_batch=4)
    engine.start()  # builds, then passes the golden vectors and the golden sequence
    engine.close()
    want = np.asarray(bundle.sequence_outputs, np.float64).copy()
    scored = np.flatnonzero(~np.isnan(want))
    assert len(scored) > 0
    want[scored[-1]] += 1.0  # one scored row of the sequence off by far more than tolerance
    bad = dataclasses.replace(bundle, sequence_outputs=want.astype(np.float32))
    with pytest.raises(ModelError, match="golden-vector sequence parity"):
        make_engine(tmp_path / "bad", bad, max_batch=n, opt_batch=4).start()


def test_build_then_start_reuses_the_built_engine(fake_trt: ModuleType, tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_batch=64)
    engine.build()  # what the serving chain runs in a background thread
    assert not engine.needs_build() and engine.status == "built"
    engine.start()
    assert len(fake_trt.FAKE.builds) == 1 and engine.cache.stats.hits == 0
    engine.close()


def test_profile_shapes_come_from_the_batch_config(fake_trt: ModuleType, tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_batch=512, opt_batch=32, workspace_mb=256)
    engine.start()
    (build,) = fake_trt.FAKE.builds
    assert build["profile"] == {"features": [[1, 16], [32, 16], [512, 16]]}
    assert build["workspace"] == 256 << 20
    assert engine.key().profile == (("features", (1, 16), (32, 16), (512, 16)),)
    engine.infer(np.zeros((512, 16), np.float32))  # the profile's max batch runs
    with pytest.raises(ValueError, match="batch size"):
        engine.infer(np.zeros((513, 16), np.float32))
    engine.close()


@pytest.mark.parametrize(
    ("fast_fp16", "manifest_fp16", "requested", "expected"),
    [
        (True, True, "auto", "fp16"),
        (False, True, "auto", "fp32"),
        (True, False, "auto", "fp32"),
        (False, False, "auto", "fp32"),
        (True, True, "fp32", "fp32"),
        (False, True, "fp16", "fp16"),
    ],
)
def test_fp16_is_chosen_only_when_the_gpu_is_fast_and_the_manifest_allows(
    fake_trt: ModuleType,
    tmp_path: Path,
    make_model: Callable[..., Path],
    fast_fp16: bool,
    manifest_fp16: bool,
    requested: str,
    expected: str,
) -> None:
    fake_trt.FAKE.fast_fp16 = fast_fp16
    bundle = load_bundle(str(make_model(fp16=manifest_fp16, golden_rtol=0.01)))
    engine = make_engine(tmp_path / "cache", bundle, precision=requested)
    engine.start()
    assert engine.precision == expected == engine.key().precision
    assert fake_trt.FAKE.builds[0]["fp16"] is (expected == "fp16")
    engine.close()


def test_fp16_forced_without_the_manifests_consent_is_refused(
    fake_trt: ModuleType, tmp_path: Path
) -> None:
    engine = make_engine(tmp_path, precision="fp16")
    assert engine.needs_build() is False  # nothing the chain could build; start() says why
    with pytest.raises(ModelError, match='"fp16": true'):
        engine.start()


def test_fp16_engine_fails_parity_without_a_relative_tolerance(
    fake_trt: ModuleType, tmp_path: Path, make_model: Callable[..., Path]
) -> None:
    bundle = load_bundle(str(make_model(fp16=True, golden_atol=1e-4, golden_rtol=0)))
    engine = make_engine(tmp_path / "cache", bundle)
    with pytest.raises(ModelError, match=r"atol 0\.0001 \+ rtol 0"):
        engine.start()


def test_a_changed_key_builds_a_new_engine(fake_trt: ModuleType, tmp_path: Path) -> None:
    import pycuda.driver as drv

    make_engine(tmp_path).start()
    fake_trt.__version__ = "10.4.0"  # a TensorRT upgrade
    upgraded = make_engine(tmp_path)
    assert upgraded.needs_build()
    upgraded.start()
    assert upgraded.status == "built"
    drv.FAKE.gpu_name, drv.FAKE.compute_capability = "Fake Thor", (10, 1)  # SD card moved
    moved = make_engine(tmp_path)
    moved.start()
    assert moved.status == "built" and len(fake_trt.FAKE.builds) == 3
    assert len({r["key16"] for r in list_cache(tmp_path)}) == 3


def test_metadata_that_does_not_match_the_key_is_rebuilt(
    fake_trt: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(tmp_path)
    engine.start()
    meta_path = tmp_path / f"{engine.key().stem}.json"
    meta = json.loads(meta_path.read_text())
    meta["fields"]["precision"] = "fp16"
    meta_path.write_text(json.dumps(meta))
    again = make_engine(tmp_path)
    assert again.needs_build()
    again.start()
    assert again.status == "built" and again.cache.stats.invalid_rebuilt == 1
    assert "metadata key fields do not match" in caplog.text
    assert json.loads(meta_path.read_text())["fields"]["precision"] == "fp32"  # rewritten


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-metadata"])
def test_a_corrupt_engine_file_is_rebuilt_not_loaded(
    fake_trt: ModuleType, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(tmp_path)
    engine.start()
    engine.close()
    path = tmp_path / f"{engine.key().stem}.engine"
    original = path.read_bytes()
    data = bytearray(original)
    if damage == "flip":
        data[0] ^= 0xFF  # same size, metadata matches: only deserialization can tell
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.with_suffix(".json").unlink()
    again = make_engine(tmp_path)
    again.start()
    assert again.status == "built" and again.cache.stats.invalid_rebuilt == 1
    assert len(fake_trt.FAKE.builds) == 2
    assert path.read_bytes() == original  # the damaged file was replaced by a fresh build
    assert caplog.text.count("rebuilding it") == 1
    again.check_parity()


def test_an_engine_from_another_tensorrt_version_never_loads(
    fake_trt: ModuleType, tmp_path: Path
) -> None:
    """Even copied over the right file name, a foreign plan does not deserialize → rebuilt."""
    engine = make_engine(tmp_path)
    engine.start()
    stem = engine.key().stem
    fake_trt.__version__ = "10.7.0"
    other = make_engine(tmp_path)
    other.start()
    other_stem = other.key().stem
    # put the 10.7 engine where the 10.3 one was, with a matching size in its metadata
    foreign = (tmp_path / f"{other_stem}.engine").read_bytes()
    (tmp_path / f"{stem}.engine").write_bytes(foreign)
    meta = json.loads((tmp_path / f"{stem}.json").read_text())
    meta["size"] = len(foreign)
    (tmp_path / f"{stem}.json").write_text(json.dumps(meta))
    fake_trt.__version__ = "10.3.0"
    back = make_engine(tmp_path)
    back.start()
    assert back.status == "built" and back.cache.stats.invalid_rebuilt == 1


def test_an_onnx_graph_that_does_not_match_its_manifest_is_refused(
    fake_trt: ModuleType, tmp_path: Path, make_model: Callable[..., Path]
) -> None:
    bundle = load_bundle(str(make_model(input="inputs")))
    with pytest.raises(ModelError, match=r"graph I/O \['features'\].*manifest's inputs→score"):
        make_engine(tmp_path / "cache", bundle).start()
    assert not list((tmp_path / "cache").glob("*.engine"))


def test_an_onnx_file_tensorrt_cannot_parse_is_a_model_error(
    fake_trt: ModuleType, tmp_path: Path, make_model: Callable[..., Path]
) -> None:
    d = make_model()
    garbage = b"not an onnx graph"
    (d / "model.onnx").write_bytes(garbage)
    make_model_sha = hashlib.sha256(garbage).hexdigest()
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "onnx_sha256": make_model_sha}))
    with pytest.raises(ModelError, match=r"tensorrt cannot parse .*model\.onnx: ModelImporter"):
        make_engine(tmp_path / "cache", load_bundle(str(d))).start()


def test_a_build_failure_is_a_model_error(fake_trt: ModuleType, tmp_path: Path) -> None:
    fake_trt.FAKE.build_fail = True
    engine = make_engine(tmp_path)
    with pytest.raises(ModelError, match="failed to build"):
        engine.start()
    assert not list(tmp_path.glob("*.engine"))


def test_parity_failure_names_backend_model_and_tolerances(
    fake_trt: ModuleType, tmp_path: Path, make_model: Callable[..., Path]
) -> None:
    fake_trt.FAKE.corrupt_output = True
    bundle = load_bundle(str(make_model(golden_atol=1e-3, golden_rtol=1e-2)))
    engine = make_engine(tmp_path / "cache", bundle)
    with pytest.raises(ModelError) as err:
        engine.start()
    msg = str(err.value)
    assert msg.startswith("tensorrt: model cnc_anomaly 1.0.0 fails its golden-vector parity")
    assert "atol 0.001" in msg and "rtol 0.01" in msg and "element " in msg


def test_a_cuda_error_at_run_time_propagates_as_an_exception(
    fake_trt: ModuleType, tmp_path: Path
) -> None:
    engine = make_engine(tmp_path)
    engine.start()
    fake_trt.FAKE.runtime_error = True
    with pytest.raises(RuntimeError, match="CUDA error"):
        engine.infer(np.zeros((4, 16), np.float32))
    assert engine.stats.errors == 1
    fake_trt.FAKE.runtime_error = False
    engine.close()


def test_close_frees_the_device_buffers(fake_trt: ModuleType, tmp_path: Path) -> None:
    import pycuda.driver as drv

    engine = make_engine(tmp_path)
    engine.start()
    assert drv.live_allocations() == 2
    engine.release()
    assert drv.live_allocations() == 0


def test_an_unwritable_cache_dir_is_a_model_error_naming_it(
    fake_trt: ModuleType, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    engine = make_engine(blocker / "engines")
    with pytest.raises(ModelError, match=f"engine cache dir {blocker / 'engines'} is not writable"):
        engine.start()


def test_two_processes_building_the_same_engine_build_it_once(
    fake_trt: ModuleType, tmp_path: Path
) -> None:
    """Two real processes start together; the flock makes the second wait and load."""
    log, cache, ready = tmp_path / "builds.log", tmp_path / "cache", tmp_path / "ready"
    ready.mkdir()
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from appliance.infer.bundle import load_bundle
        from appliance.infer.trt import TrtEngine
        e = TrtEngine(load_bundle("cnc_anomaly"), cache_dir={str(cache)!r}, max_batch=64)
        e.key()
        ready = Path({str(ready)!r})
        (ready / str(os.getpid())).touch()
        while len(list(ready.iterdir())) < 2:
            time.sleep(0.01)
        e.start()
        print(e.status, e.cache.stats.waited_for_other_builder)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(FAKE_DIR), str(REPO)]),
        "FAKE_TRT_BUILD_DELAY_S": "2.0",
        "FAKE_TRT_BUILD_LOG": str(log),
    }
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = sorted(p.communicate(timeout=90)[0].split() for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert [o[0] for o in outs] == ["built", "cached"]
    assert len(log.read_text().splitlines()) == 1  # one build across both processes
    # the second process normally found the lock held and waited (unless it was so slow to
    # reach it that the engine was already there)
    assert outs[0][1] == "0"


def test_a_held_lock_makes_the_builder_wait(fake_trt: ModuleType, tmp_path: Path) -> None:
    """In-process view of the same guarantee: build() blocks while the key's lock is held."""
    import threading

    engine = make_engine(tmp_path)
    cache = EngineCache(tmp_path)
    done = threading.Event()
    with cache.lock(engine.key()):
        t = threading.Thread(target=lambda: (engine.build(), done.set()))
        t.start()
        time.sleep(0.3)
        assert not done.is_set()
    t.join(30)
    assert done.is_set() and engine.cache.stats.waited_for_other_builder == 1
