"""``model.release`` and ``model.rollback``: signed model releases with automatic rollback
(issue 16; docs/mqtt.md "Commands", docs/models.md "Releasing a model").

``model.release`` receives a release (:mod:`appliance.modelkit.release`) as chunks, one request
each: ``{"name", "version", "chunk": i, "chunks": n, "sha256_chunk", "data": base64}``, the last
chunk (``i = n - 1``) adding ``release`` (the signed statement's text) and ``signature``; an
optional ``model`` names the served model when several serve the same bundle name. Each chunk
is checked on arrival (base64, its sha256, the index, the running total against
``downlink.max_model_bytes``) and stored in ``<state_dir>/models/staging/<model>/<version>/``;
its reply is ``ok`` (``received`` of ``chunks``). Chunks may come in any order; a chunk of
another version of the same model abandons the partial one.

When the last missing chunk arrives, in an executor thread (never on the loop): the signature
over the statement's exact bytes against ``downlink.model_keys``; the statement's name and version
against the request's; the archive's size and sha256; every file's sha256; the manifest loaded
exactly as serving loads it; the same feature layout as the model serving now; then a
:class:`~appliance.infer.ServingEngine` for it is built and started, which runs the golden parity
check on every backend before it may serve. Any failure: reply ``refused`` with the reason,
counted (``stats()["models"][<model>]["release"]["refused"]``), staging removed, the running
model untouched.

Then the swap: the new engine replaces the old one in the batcher between two batches
(:meth:`~appliance.batch.Batcher.replace_engine`), the old engine stays loaded as its fallback,
the files go to ``<state_dir>/models/<model>/<version>/`` and ``active.json`` records the
version, so it serves again after a restart. The reply waits for the first batch the new
model scores (at most 2 × ``features.window_s`` + 1 s): ``ok``, or ``rolled_back`` when that
batch failed. A run-time failure of the new model at any later time re-runs the batch on the
previous model (no window lost) and rolls back the same way (logged, and counted in
``release.rolled_back``, ``release.last`` says why).

``model.rollback`` (``{"name"}``, optional ``model``) goes back one version in the history.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.downlink.base import CommandContext, Handler, Reply, Request
from appliance.errors import ApplianceError
from appliance.infer import EngineOptions, ModelBundle, ServingEngine, load_bundle
from appliance.modelkit.release import (
    SIGNATURE_FILE,
    STATEMENT_FILE,
    ReleaseError,
    Statement,
    bundle_files,
    extract_archive,
    load_keys,
    sha256_hex,
    verify_statement,
)
from appliance.runtime.model_store import ModelStore, check_name, same_layout

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.runtime.supervisor import Appliance, GuardedEngine, _Model

log = logging.getLogger(__name__)

#: served models with a release or rollback being verified or swapped (one at a time each)
_busy: set[str] = set()
#: model -> (version, reason) of a release that was refused: its later chunks are refused too,
#: until its chunk 0 comes again (the release re-sent)
_refused: dict[str, tuple[str, str]] = {}


def _refuse(model: _Model | None, message: str, **body: Any) -> Reply:
    if model is not None:
        model.releases["refused"] += 1
        model.releases["last"] = f"refused: {message}"
    log.warning("model.release refused: %s", message)
    return Reply("refused", message, body)


def _target(app: Appliance, name: str, binding: object) -> _Model | str:
    """The served model a request is for, or why there is none."""
    if binding is not None:
        for m in app.models:
            if m.name == binding:
                return m
        return f"model {binding!r} is not served here (served: {[m.name for m in app.models]})"
    found = [m for m in app.models if m.bundle.name == name]
    if len(found) == 1:
        return found[0]
    if not found:
        return (
            f"no served model has bundle name {name!r} (served: "
            f"{sorted({m.bundle.name for m in app.models})})"
        )
    return f"several served models have bundle {name!r}: give `model` ({[m.name for m in found]})"


def _store_chunk(
    staging: Path,
    version: str,
    i: int,
    n: int,
    data: bytes,
    last: tuple[str, str] | None,
    max_bytes: int,
) -> tuple[int, bool]:
    """Store chunk ``i`` of ``n`` (thread). Returns (chunks received, release complete)."""
    if staging.is_dir():
        for other in staging.iterdir():
            if other.name != version:
                log.warning("abandoning the partial release %s/%s", staging.name, other.name)
                shutil.rmtree(other, ignore_errors=True)
    d = staging / version
    d.mkdir(parents=True, exist_ok=True)
    meta = d / "meta.json"
    if meta.exists():
        before = json.loads(meta.read_text())["chunks"]
        if before != n:
            raise ReleaseError(f"chunks: {n}, but earlier chunks of this release said {before}")
    else:
        meta.write_text(json.dumps({"chunks": n}))
    path = d / f"chunk-{i:06d}"
    total = len(data) + sum(p.stat().st_size for p in d.glob("chunk-*") if p.name != path.name)
    if total > max_bytes:
        raise ReleaseError(
            f"bundle exceeds downlink.max_model_bytes ({max_bytes} bytes) at chunk {i}"
        )
    tmp = d / f".{path.name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)
    if last is not None:
        (d / STATEMENT_FILE).write_text(last[0], encoding="utf-8")
        (d / SIGNATURE_FILE).write_text(last[1], encoding="utf-8")
    received = sum(1 for _ in d.glob("chunk-*"))
    return received, received == n and (d / STATEMENT_FILE).exists()


def _verify(
    d: Path, name: str, version: str, n: int, keys: tuple[str, ...]
) -> tuple[Statement, str, ModelBundle]:
    """Signature, statement, archive, files and manifest of a complete staged release
    (thread). Raises ReleaseError/ApplianceError naming what is wrong."""
    statement, kid = verify_statement(
        (d / STATEMENT_FILE).read_bytes(), (d / SIGNATURE_FILE).read_text(), load_keys(keys)
    )
    if (statement.name, statement.version) != (name, version):
        raise ReleaseError(
            f"the signed statement is for {statement.name} {statement.version}, "
            f"the request for {name} {version}"
        )
    archive = b"".join((d / f"chunk-{i:06d}").read_bytes() for i in range(n))
    bundle_dir = d / "bundle"
    shutil.rmtree(bundle_dir, ignore_errors=True)
    extract_archive(archive, statement, bundle_dir)
    named = bundle_files(bundle_dir)  # plain names only: nothing outside the bundle is read
    if set(named) != set(statement.files):
        raise ReleaseError(
            f"manifest.json names the files {named}, the statement {sorted(statement.files)}"
        )
    bundle = load_bundle(str(bundle_dir))
    if (bundle.name, bundle.version) != (name, version):
        raise ReleaseError(
            f"manifest.json names {bundle.name} {bundle.version}, the statement {name} {version}"
        )
    return statement, kid, bundle


def _start_engine(cfg: Config, bundle: ModelBundle) -> ServingEngine:
    """Build and start an engine for ``bundle`` (thread): the golden parity check included."""
    engine = ServingEngine(bundle, cfg.engine.backend, EngineOptions.from_config(cfg, bundle))
    try:
        engine.start()
    except BaseException:
        engine.close()
        raise
    return engine


def _history(store: ModelStore, model: _Model) -> list[str]:
    """The model's history; on the first release the configured bundle's files are copied
    into the store so that it can be rolled back to."""
    history = list(store.state(model.name)["history"])
    if not history or history[-1] != model.bundle.version:
        b = model.bundle
        files = sorted({"manifest.json", b.onnx_path.name, str(b.manifest["golden"])})
        store.install(model.name, b.version, b.directory, files)
        history = [v for v in history if v != b.version] + [b.version]
    return history


async def _swap(
    ctx: CommandContext,
    model: _Model,
    store: ModelStore,
    bundle: ModelBundle,
    engine: ServingEngine,
    history: list[str],
) -> tuple[GuardedEngine, asyncio.Future[str]]:
    """Put ``engine`` in service and record ``history`` (its version last). The future is
    resolved with the reason once a run-time failure of the new model was rolled back."""
    loop = asyncio.get_running_loop()
    rolled: asyncio.Future[str] = loop.create_future()
    version = bundle.version
    keep = ctx.config.downlink.keep_models

    async def roll_back(reason: str) -> None:
        try:
            if model.engine is engine and model.previous is not None:
                back = model.previous.bundle.version
                await model.restore_previous()
                rest = [v for v in history if v != version]
                await asyncio.to_thread(store.set_state, model.name, rest)
                model.releases["rolled_back"] += 1
                model.releases["last"] = f"rolled back {version} to {back}: {reason}"
                log.error(
                    "model %s %s failed at run time (%s): rolled back to %s",
                    model.name,
                    version,
                    reason,
                    back,
                )
        finally:
            if not rolled.done():
                rolled.set_result(reason)

    def on_failure(reason: str) -> None:  # the inference worker thread
        loop.call_soon_threadsafe(lambda: loop.create_task(roll_back(reason)))

    # recorded before the swap: once the new engine serves, a run-time failure may roll back
    # (and rewrite the state) at any moment
    await asyncio.to_thread(_record, store, model.name, history, keep)
    guard = await model.replace_model(bundle, engine, on_failure)
    return guard, rolled


def _record(store: ModelStore, model: str, history: list[str], keep: int) -> None:
    store.set_state(model, history)
    store.prune(model, keep)


async def release(ctx: CommandContext, req: Request) -> Reply:
    """``model.release``: one chunk of a signed release (see the module docstring)."""
    b = req.body
    try:
        name = check_name(str(b["name"]), "name")
        version = check_name(str(b["version"]), "version")
        i, n = b["chunk"], b["chunks"]
        if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
            raise ValueError(f"chunk {i!r} of {n!r}: need 0 <= chunk < chunks")
        data = base64.b64decode(str(b["data"]), validate=True)
        want = str(b["sha256_chunk"])
    except (KeyError, ValueError, binascii.Error) as err:
        return _refuse(None, f"malformed model.release request: {err}")
    target = _target(ctx.appliance, name, b.get("model"))
    if isinstance(target, str):
        return _refuse(None, target)
    model = target
    if model.name in _busy:
        return _refuse(model, f"model {model.name}: another release is being verified or swapped")
    store = ModelStore(ctx.state_dir)
    staging = store.staging(model.name)
    where = f"{name} {version} chunk {i} of {n}"
    earlier = _refused.get(model.name)
    if earlier is not None and earlier[0] == version and i != 0:
        return _refuse(model, f"{where}: this release was refused ({earlier[1]}); send it again")
    _refused.pop(model.name, None)
    reply = await _chunk(ctx, model, store, staging, where, name, version, i, n, data, want, b)
    if reply.code == "refused":
        _refused[model.name] = (version, reply.message)
    return reply


async def _chunk(
    ctx: CommandContext,
    model: _Model,
    store: ModelStore,
    staging: Path,
    where: str,
    name: str,
    version: str,
    i: int,
    n: int,
    data: bytes,
    want: str,
    b: Mapping[str, Any],
) -> Reply:
    if sha256_hex(data) != want:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        return _refuse(model, f"{where}: sha256 mismatch (truncated or corrupt chunk)")
    last = None
    if i == n - 1:
        if not isinstance(b.get("release"), str) or not isinstance(b.get("signature"), str):
            await asyncio.to_thread(shutil.rmtree, staging, True)
            return _refuse(model, f"{where}: the last chunk carries `release` and `signature`")
        last = (str(b["release"]), str(b["signature"]))
    max_bytes = ctx.config.downlink.max_model_bytes
    try:
        received, complete = await asyncio.to_thread(
            _store_chunk, staging, version, i, n, data, last, max_bytes
        )
    except (ReleaseError, OSError, ValueError) as err:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        return _refuse(model, f"{where}: {err}")
    if not complete:
        return Reply("ok", f"{where} stored", {"received": received, "chunks": n})
    _busy.add(model.name)
    try:
        return await _complete(ctx, model, store, staging, name, version, n)
    finally:
        _busy.discard(model.name)
        await asyncio.to_thread(shutil.rmtree, staging, True)


async def _complete(
    ctx: CommandContext,
    model: _Model,
    store: ModelStore,
    staging: Path,
    name: str,
    version: str,
    n: int,
) -> Reply:
    cfg = ctx.config
    what = f"model {model.name}: release {name} {version}"
    try:
        statement, kid, bundle = await asyncio.to_thread(
            _verify, staging / version, name, version, n, cfg.downlink.model_keys
        )
    except (ApplianceError, OSError, ValueError) as err:
        return _refuse(model, f"{what}: {err}")
    if not same_layout(model.bundle, bundle):
        return _refuse(
            model,
            f"{what}: its features, condition, window or baseline differ from the serving "
            f"model's "
            f"(such a model is deployed with config.apply)",
        )
    if bundle.version == model.bundle.version:
        return _refuse(model, f"{what}: version {version} is serving already")
    log.info("%s: signed by key %s, files verified; starting its engine", what, kid)
    try:
        engine = await asyncio.to_thread(_start_engine, cfg, bundle)
    except ApplianceError as err:
        return _refuse(model, f"{what}: {err}")
    try:
        history = await asyncio.to_thread(_history, store, model)
        files = sorted(statement.files)
        await asyncio.to_thread(store.install, model.name, version, bundle.directory, files)
        kept = await asyncio.to_thread(store.load, model.name, version)
    except (ApplianceError, OSError) as err:
        await asyncio.to_thread(engine.close)
        return Reply("error", f"{what}: storing the release failed: {err}")
    history = [v for v in history if v != version] + [version]
    before = model.bundle.version
    guard, rolled = await _swap(ctx, model, store, kept, engine, history)
    model.releases["swaps"] += 1
    model.releases["last"] = f"{before} -> {version} (key {kid})"
    log.info("%s: serving (was %s)", what, before)
    body: dict[str, Any] = {
        "model": model.name,
        "version": version,
        "previous": before,
        "key": kid,
    }
    deadline = time.monotonic() + 2 * cfg.features.window_s + 1.0
    while not guard.batches and not guard.failed and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if guard.failed:
        reason = await rolled
        return Reply("rolled_back", f"{what}: failed at run time ({reason}); {before} serves", body)
    body["scored_batches"] = guard.batches
    return Reply("ok", f"{what}: serving on {engine.backend} (was {before})", body)


async def rollback(ctx: CommandContext, req: Request) -> Reply:
    """``model.rollback``: serve the version before the active one again."""
    b = req.body
    target = _target(ctx.appliance, str(b.get("name", "")), b.get("model"))
    if isinstance(target, str):
        return _refuse(None, target)
    model = target
    if model.name in _busy:
        return _refuse(model, f"model {model.name}: a release is being verified or swapped")
    store = ModelStore(ctx.state_dir)
    history = (await asyncio.to_thread(store.state, model.name))["history"]
    if len(history) < 2 or history[-1] != model.bundle.version:
        return _refuse(model, f"model {model.name}: no earlier released version to go back to")
    current, back = history[-1], history[-2]
    _busy.add(model.name)
    try:
        prev = model.previous
        if prev is not None and prev.bundle.version == back:
            await model.restore_previous()
            await asyncio.to_thread(store.set_state, model.name, history[:-1])
        else:
            try:
                bundle = await asyncio.to_thread(store.load, model.name, back)
                engine = await asyncio.to_thread(_start_engine, ctx.config, bundle)
            except ApplianceError as err:
                return Reply("error", f"model {model.name}: version {back} cannot serve: {err}")
            await _swap(ctx, model, store, bundle, engine, history[:-1])
    finally:
        _busy.discard(model.name)
    model.releases["rolled_back"] += 1
    model.releases["last"] = f"rolled back {current} to {back} on request"
    log.warning("model %s: rolled back from %s to %s on request", model.name, current, back)
    return Reply(
        "ok",
        f"model {model.name}: {back} serves again (was {current})",
        {"model": model.name, "version": back, "previous": current},
    )


COMMANDS: dict[str, Handler] = {"model.release": release, "model.rollback": rollback}
