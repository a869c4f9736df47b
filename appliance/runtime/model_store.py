"""Released model versions on disk: ``<state_dir>/models/`` (docs/models.md, "Releasing a model").

Layout::

    models/staging/<model>/<version>/   chunks of a release being received (chunk-NNNNN, meta.json)
    models/<model>/<version>/           the bundle files of a version (manifest.json, ONNX, golden)
    models/<model>/active.json          {"active": version, "history": [versions, oldest first]}

``<model>`` is the served model's name (``[[models]]`` name, or the bundle's name with
``engine.model``). ``history`` lists the versions in the order they became active, the active
one last; ``model.rollback`` and the automatic rollback pop the last one. Versions that drop out
of the last ``downlink.keep_models`` entries of the history are deleted.

``active.json`` is replaced atomically (temp file, fsync, rename): after a crash it names either
the old or the new version, and :func:`released_bundle` loads that one at the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.infer.bundle import ModelBundle, load_bundle

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: str, what: str) -> str:
    """``value`` if it is safe as one path component (the schema's pattern), else ValueError."""
    if not NAME.match(value):
        raise ValueError(f"{what} {value!r} must match {NAME.pattern}")
    return value


def same_layout(a: ModelBundle, b: ModelBundle) -> bool:
    """Whether ``b`` can replace ``a`` in the running pipeline without rebuilding it: the same
    features in the same order, the same condition, window length and self-baseline stage
    (manifest ``baseline``: the learned per-machine state is kept across a swap)."""
    return (
        a.features == b.features
        and a.condition == b.condition
        and a.window_s == b.window_s
        and a.drift == b.drift
    )


class ModelStore:
    """The released versions under ``<state_dir>/models``. Blocking file I/O: handlers call it
    from an executor thread; one model is changed by one release at a time."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "models"

    def staging(self, model: str) -> Path:
        return self.root / "staging" / check_name(model, "model")

    def version_dir(self, model: str, version: str) -> Path:
        return self.root / check_name(model, "model") / check_name(version, "version")

    def _state_path(self, model: str) -> Path:
        return self.root / check_name(model, "model") / "active.json"

    def state(self, model: str) -> dict[str, Any]:
        """``{"active": str | None, "history": [str, ...]}`` (empty when nothing was released)."""
        try:
            doc = json.loads(self._state_path(model).read_text(encoding="utf-8"))
            history = [str(v) for v in doc["history"]]
            return {"active": str(doc["active"]), "history": history}
        except FileNotFoundError:
            return {"active": None, "history": []}
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.error(
                "%s: unreadable (%s); ignoring released versions", self._state_path(model), err
            )
            return {"active": None, "history": []}

    def set_state(self, model: str, history: list[str]) -> None:
        """Record ``history`` (active version last) atomically."""
        path = self._state_path(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        data = json.dumps({"active": history[-1], "history": history}, indent=1).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def install(self, model: str, version: str, src: Path, files: list[str]) -> Path:
        """Copy ``files`` of ``src`` into the version's folder (replacing an earlier copy)."""
        dest = self.version_dir(model, version)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in files:
            shutil.copyfile(src / name, tmp / name)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest

    def prune(self, model: str, keep: int) -> list[str]:
        """Delete the version folders not among the last ``keep`` history entries."""
        history = self.state(model)["history"]
        kept = set(history[-keep:])
        removed: list[str] = []
        base = self.root / check_name(model, "model")
        for d in sorted(base.iterdir()) if base.is_dir() else []:
            if d.is_dir() and d.name not in kept:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        if len(history) > keep:
            self.set_state(model, history[-keep:])
        return removed

    def load(self, model: str, version: str) -> ModelBundle:
        return load_bundle(str(self.version_dir(model, version)))


def released_bundle(state_dir: Path, model: str, configured: ModelBundle) -> ModelBundle:
    """The bundle to serve for ``model`` at start: the active released version recorded in the
    state dir, when there is one that loads and fits the pipeline the configured bundle sets up
    (same feature layout); else ``configured`` (the reason logged)."""
    store = ModelStore(state_dir)
    try:
        active = store.state(model)["active"]
    except ValueError:  # a name that cannot be a folder was never released
        return configured
    if active is None:
        return configured
    try:
        bundle = store.load(model, active)
    except (ApplianceError, ValueError) as err:
        log.error(
            "model %s: released version %s does not load (%s); serving the configured bundle %s",
            model,
            active,
            err,
            configured.version,
        )
        return configured
    if not same_layout(configured, bundle):
        log.error(
            "model %s: released version %s has another feature layout than the "
            "configured bundle; serving the configured %s",
            model,
            active,
            configured.version,
        )
        return configured
    log.info(
        "model %s: serving released version %s (%s)",
        model,
        active,
        store.version_dir(model, active),
    )
    return bundle
