"""Checks of a loaded config against what running it needs, shared by ``Appliance(cfg)`` and
``appliance check-config`` so that the two never disagree.

:func:`load_model_for` refuses (``ConfigError`` naming the key) what the appliance cannot run;
:func:`config_warnings` lists what it can run but probably should not.
"""

from __future__ import annotations

from appliance.config import Config, ModbusTcpConfig
from appliance.errors import ConfigError, ModelError
from appliance.infer import ModelBundle, load_bundle


def load_model_for(cfg: Config) -> ModelBundle:
    """The model bundle ``engine.model`` names, checked against ``features.window_s``.

    Raises :class:`ConfigError` naming the key: a model that cannot be loaded (missing,
    corrupt) or one trained on another window length.
    """
    try:
        bundle = load_bundle(cfg.engine.model)
    except ModelError as err:
        raise ConfigError(f"engine.model: {err}") from None
    if abs(bundle.window_s - cfg.features.window_s) > 1e-9:
        raise ConfigError(
            f"features.window_s = {cfg.features.window_s} but model {bundle.name} "
            f"(engine.model) was trained on {bundle.window_s} s windows"
        )
    return bundle


def config_warnings(cfg: Config) -> list[str]:
    """Settings that run but are most likely a mistake, one sentence each.

    Two Modbus TCP devices with the same host, port and unit id read the same unit twice (a
    copied block whose ``host`` was not edited, typically).
    """
    out: list[str] = []
    first: dict[tuple[str, int, int], int] = {}
    for i, dev in enumerate(cfg.devices):
        if not isinstance(dev, ModbusTcpConfig):
            continue
        key = (dev.host, dev.port, dev.unit_id)
        if key in first:
            j = first[key]
            out.append(
                f"devices[{i}] ({dev.name}): host {dev.host}, port {dev.port}, unit_id "
                f"{dev.unit_id} are those of devices[{j}] ({cfg.devices[j].name}): both read "
                "the same unit"
            )
        else:
            first[key] = i
    return out
