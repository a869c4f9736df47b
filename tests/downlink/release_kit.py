"""Helpers of the model release tests (``from release_kit import ...``): keys, release bundles
made from a shipped model (a new version whose scores are the old ones times a factor, so the
telemetry shows which version scored; or one whose golden outputs were altered), their signed
request bodies, and a :class:`~appliance.downlink.base.CommandContext` over a real Appliance."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from appliance.config import Config
from appliance.infer.bundle import MODELS_DIR
from appliance.modelkit.release import generate_keys, release_bodies, sign_bundle
from appliance.runtime import Appliance


def make_keys(folder: Path) -> tuple[Path, str]:
    """A fresh key pair in ``folder``: the private key file and the ``ed25519:`` config line."""
    priv, _pub, line = generate_keys(folder)
    return priv, line


def make_bundle(
    dst: Path,
    version: str,
    *,
    src: str = "cnc_anomaly",
    factor: float = 1.0,
    golden_shift: float = 0.0,
) -> Path:
    """A copy of the shipped model ``src`` as ``version``: its score multiplied by ``factor``
    (the ONNX graph gets a Mul; the golden outputs follow), the golden outputs then shifted by
    ``golden_shift`` (a bundle failing its parity check when not 0)."""
    shutil.copytree(MODELS_DIR / src, dst, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    manifest = json.loads((dst / "manifest.json").read_text())
    onnx_path = dst / manifest["onnx"]
    if factor != 1.0:
        model = onnx.load(str(onnx_path))
        out = manifest["output"]
        for node in model.graph.node:
            node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
        model.graph.initializer.append(
            numpy_helper.from_array(np.array(factor, np.float32), "release_factor")
        )
        model.graph.node.append(helper.make_node("Mul", [f"{out}_raw", "release_factor"], [out]))
        onnx.save(model, str(onnx_path))
    with np.load(dst / manifest["golden"]) as g:
        inputs, outputs = g["inputs"], g["outputs"]
    outputs = (outputs.astype(np.float32) * np.float32(factor) + np.float32(golden_shift)).astype(
        np.float32
    )
    np.savez(dst / manifest["golden"], inputs=inputs, outputs=outputs)
    manifest["version"] = version
    manifest["onnx_sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def signed_bodies(bundle: Path, private_key: Path, chunk_bytes: int = 2048) -> list[dict[str, Any]]:
    """Sign ``bundle`` with ``private_key`` and split it into ``model.release`` bodies."""
    sign_bundle(bundle, private_key)
    return release_bodies(bundle, chunk_bytes=chunk_bytes)


@dataclass
class Ctx:
    """A CommandContext over a real (not necessarily started) Appliance."""

    appliance: Appliance
    config: Config
    state_dir: Path
    config_path: Path | None = None
