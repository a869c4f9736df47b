"""Checks of a loaded config against what running it needs, shared by ``Appliance(cfg)`` and
``appliance check-config`` so that the two never disagree.

:func:`load_model_for` refuses (``ConfigError`` naming the key) what the appliance cannot run;
:func:`config_warnings` lists what it can run but probably should not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from appliance.config import Config, ModbusTcpConfig
from appliance.errors import ConfigError, ModelError
from appliance.infer import ModelBundle, load_bundle


class ServedModel(NamedTuple):
    """A model the appliance serves: its name (telemetry ``scores`` key, score rules'
    ``model``), the config key that names it, its bundle and the machines it scores."""

    name: str
    key: str
    bundle: ModelBundle
    machines: tuple[str, ...]


def device_channels(cfg: Config) -> dict[str, set[str]]:
    """Channel names of every configured device (registers and the waveform channel)."""
    out: dict[str, set[str]] = {}
    for dev in cfg.devices:
        names = {r.name for r in dev.registers}
        waveform = getattr(dev, "waveform", None)
        if waveform is not None:
            names.add(waveform.channel)
        out[dev.name] = names
    return out


def served_models(cfg: Config) -> list[ServedModel]:
    """Every model to serve: the ``[[models]]`` entries, or ``engine.model`` for all machines;
    none (an empty list: nothing is scored) when there is no ``[[models]]`` entry and
    ``engine.model`` is ``""``.

    Raises :class:`ConfigError` naming the key: a model that cannot be loaded, one trained on
    another window length than ``features.window_s``, or (a ``[[models]]`` entry) one that needs
    channels a machine it serves does not have (listed). The implicit ``engine.model`` keeps its
    behaviour: a machine without its channels has its windows counted as incomplete (and
    :func:`config_warnings` names it).
    """
    if not cfg.models and not cfg.engine.model:
        return []
    if not cfg.models:
        bundle = load_model_for(cfg)
        served = [ServedModel(bundle.name, "engine.model", bundle, ())]
    else:
        served = []
        for i, b in enumerate(cfg.models):
            key = f"models[{i}] ({b.name}).model"
            try:
                bundle = load_bundle(b.model)
            except ModelError as err:
                raise ConfigError(f"{key}: {err}") from None
            _check_window(cfg, bundle, key)
            served.append(ServedModel(b.name, key, bundle, b.machines))
    channels = device_channels(cfg)
    for m in served if cfg.models else ():
        needed = {f.channel for f in m.bundle.features} | {c[0].channel for c in m.bundle.condition}
        for machine in m.machines or tuple(channels):
            missing = sorted(needed - channels.get(machine, set()))
            if missing:
                raise ConfigError(
                    f"{m.key}: model {m.bundle.name} needs channels that device {machine!r} "
                    f"does not have: {', '.join(missing)}"
                )
    return served


def _check_window(cfg: Config, bundle: ModelBundle, key: str) -> None:
    if abs(bundle.window_s - cfg.features.window_s) > 1e-9:
        raise ConfigError(
            f"features.window_s = {cfg.features.window_s} but model {bundle.name} "
            f"({key}) was trained on {bundle.window_s} s windows"
        )


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


def config_warnings(cfg: Config, served: Sequence[ServedModel] = ()) -> list[str]:
    """Settings that run but are most likely a mistake, one sentence each.

    Two Modbus TCP devices with the same host, port and unit id read the same unit twice (a
    copied block whose ``host`` was not edited, typically). The implicit ``engine.model`` (of
    ``served``) needs channels a device does not have: its windows are never scored (a
    ``[[models]]`` model is refused for that instead, by :func:`served_models`).
    """
    out: list[str] = []
    channels = device_channels(cfg)
    for m in served:
        if m.key != "engine.model":
            continue
        needed = {f.channel for f in m.bundle.features} | {c[0].channel for c in m.bundle.condition}
        for i, dev in enumerate(cfg.devices):
            missing = sorted(needed - channels.get(dev.name, set()))
            if missing:
                out.append(
                    f"engine.model: model {m.bundle.name} needs channels that devices[{i}] "
                    f"({dev.name}) does not have: {', '.join(missing)}; its windows are never "
                    "scored (bind the model to other machines with [[models]], or set "
                    'engine.model = "" for no model)'
                )
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
