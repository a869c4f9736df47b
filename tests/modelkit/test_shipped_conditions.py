"""The shipped bundles' ``condition`` is what their export scripts declare (the scripts write it
through ``condition_manifest``; a script edited without re-exporting would serve windows the
model was not trained on)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from appliance.modelkit.export import condition_manifest
from models import simulated

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize(
    "name", ["cnc_condition", "cnc_autoencoder", "cnc_process", "cnc_spectrogram"]
)
def test_the_shipped_condition_matches_the_export_script(name: str) -> None:
    script = importlib.import_module(f"models.{name}.export")
    # The scripts that export through models.simulated (all but cnc_spectrogram) use its CONDITION.
    condition = getattr(script, "CONDITION", simulated.CONDITION)
    manifest = json.loads((MODELS / name / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["condition"] == condition_manifest(condition)
    assert any("max" not in c for c in manifest["condition"])  # an open upper bound is left out
