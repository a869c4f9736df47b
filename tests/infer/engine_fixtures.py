"""Fixtures for the engine tests: the TensorRT/pycuda TEST DOUBLE and model copies.

Imported by the test modules that use them (``from engine_fixtures import fake_trt``): a
``conftest.py`` here would shadow ``tests/conftest.py``, which other tests import by name.

``fake_trt`` puts ``tests/infer/fake_tensorrt`` (a fake of the ``tensorrt`` and ``pycuda``
packages, see its README) first on ``sys.path`` for one test and removes it afterwards. Real
TensorRT cannot run here; everything else (onnxruntime, the cache on disk, file locks,
processes) is real.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from appliance.infer.bundle import MODELS_DIR

__all__ = ["fake_trt", "make_model"]

FAKE_DIR = Path(__file__).parent / "fake_tensorrt"


def _forget_fake_modules() -> None:
    for name in list(sys.modules):
        if name == "tensorrt" or name.startswith(("tensorrt.", "pycuda")):
            del sys.modules[name]


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake ``tensorrt`` module (knobs on ``.FAKE``; GPU knobs on ``pycuda.driver.FAKE``)."""
    for var in list(os.environ):
        if var.startswith("FAKE_"):
            monkeypatch.delenv(var)
    _forget_fake_modules()
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    import tensorrt

    yield tensorrt
    _forget_fake_modules()


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """``make_model(**manifest)``: a copy of the shipped model with manifest keys overridden."""

    def make(**manifest: Any) -> Path:
        d = tmp_path / "model"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(MODELS_DIR / "cnc_anomaly", d)
        m = json.loads((d / "manifest.json").read_text())
        m.update(manifest)
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    return make
