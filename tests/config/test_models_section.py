"""`[[models]]`: several models, each bound to machines, checked against the devices."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.config import load_config, parse_config
from appliance.errors import ConfigError
from appliance.infer.bundle import MODELS_DIR
from appliance.runtime import Appliance
from appliance.runtime.checks import served_models

DEV = {"name": "cnc-1", "host": "127.0.0.1", "profile": "cnc-sim", "waveform": {}}


def _cfg(tmp_path: Path, **extra: Any) -> Any:
    data = {"devices": [DEV, {**DEV, "name": "cnc-2", "waveform": None}], **extra}
    if data["devices"][1]["waveform"] is None:
        del data["devices"][1]["waveform"]
    data.setdefault("outbox", {"path": "o.sqlite"})
    return parse_config(data, base_dir=tmp_path)


def test_two_models_get_their_own_batchers_and_machines(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        models=[
            {"name": "anomaly", "model": "cnc_anomaly"},
            {"name": "condition", "model": "cnc_condition", "machines": ["cnc-1"]},
        ],
        alerts={"rules": [{"name": "cond", "source": "score", "model": "condition", "above": 1}]},
    )
    app = Appliance(cfg)
    assert [(m.name, sorted(m.machines)) for m in app.models] == [
        ("anomaly", ["cnc-1", "cnc-2"]),
        ("condition", ["cnc-1"]),
    ]
    assert app.models[0].batcher is not app.models[1].batcher
    assert app.models[1].sample_features is not None  # sample statistics: served from samples
    assert set(app.stats()["models"]) == {"anomaly", "condition"}


def test_a_model_needing_channels_a_machine_lacks_is_refused_listing_them(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, models=[{"name": "condition", "model": "cnc_condition"}])
    with pytest.raises(ConfigError, match=r"models\[0\] \(condition\)\.model: .* device 'cnc-2'"):
        served_models(cfg)
    with pytest.raises(ConfigError, match="vibration_wave"):
        served_models(cfg)


def test_a_rule_naming_an_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"alerts.rules\[0\] \(r\)\.model: 'nope'"):
        _cfg(
            tmp_path,
            models=[{"name": "anomaly", "model": "cnc_anomaly"}],
            alerts={"rules": [{"name": "r", "source": "score", "model": "nope", "above": 1}]},
        )


def test_check_config_refuses_a_missing_model_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "a.toml"
    conf.write_text(
        '[[devices]]\nname = "cnc-1"\nhost = "127.0.0.1"\nprofile = "cnc-sim"\n'
        '[[models]]\nname = "x"\nmodel = "./nowhere"\n'
    )
    assert main(["check-config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "models[0] (x).model" in err and str(tmp_path / "nowhere") in err


def test_a_relative_models_path_resolves_against_the_config_folder_not_the_cwd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(MODELS_DIR / "cnc_anomaly", conf / "bundles" / "anomaly")
    path = conf / "cell.toml"
    path.write_text(
        '[[devices]]\nname = "cnc-1"\nhost = "127.0.0.1"\nprofile = "cnc-sim"\n'
        '[[models]]\nname = "a"\nmodel = "bundles/anomaly"\n'
    )
    monkeypatch.chdir("/")
    assert main(["check-config", str(path)]) == 0
    assert "models a" in capsys.readouterr().out
    served = served_models(load_config(path))
    assert served[0].bundle.directory == conf / "bundles" / "anomaly"
