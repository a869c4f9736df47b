"""``model.release`` / ``model.rollback`` against a real Appliance (its real engine and batcher,
real onnxruntime, real Ed25519 signatures), the handlers called directly; the end-to-end tests
through Mosquitto are in ``test_model_release_e2e.py``.

Rows are fed straight into the model's batcher (one per 2 ms, each a golden input vector with a
unique window end) and the score consumer is captured, so each test can say exactly which rows
were scored, once each, and by which version: the released versions multiply the shipped
model's score by a factor (``release_kit.make_bundle``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from release_kit import Ctx, make_bundle, make_keys, signed_bodies

from appliance.api.metrics import ApplianceCollector
from appliance.cli import main
from appliance.config import parse_config
from appliance.contracts import FeatureRow, ScoreBatch
from appliance.downlink.base import Reply, Request
from appliance.downlink.model_release import COMMANDS
from appliance.errors import ConfigError
from appliance.infer import select
from appliance.infer.bundle import load_bundle
from appliance.infer.ort import OrtEngine
from appliance.modelkit import release as rel
from appliance.runtime import Appliance
from appliance.runtime.model_store import ModelStore


def config(tmp_path: Path, keys: list[str], **downlink: Any) -> Any:
    return parse_config(
        {
            "appliance": {"allow_no_devices": True},
            "outbox": {"path": "state/outbox.sqlite"},
            "downlink": {"model_keys": keys, **downlink},
        },
        base_dir=tmp_path,
    )


class Feed:
    """Feeds golden rows into the first model's batcher and records every score it emits."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.golden = load_bundle("cnc_anomaly")
        self.sent = 0
        self.scored: dict[int, float] = {}
        self.duplicates = 0
        app.models[0].batcher._emit = self._on_scores  # capture the score consumer

    def _on_scores(self, batch: ScoreBatch) -> None:
        for end, score in zip(batch.window_end, batch.score, strict=True):
            i = int(end)
            if i in self.scored:
                self.duplicates += 1
            self.scored[i] = float(score) / float(
                self.golden.golden_outputs[i % len(self.golden.golden_outputs)]
            )

    async def run(self, stop: asyncio.Event) -> None:
        g = self.golden.golden_inputs
        while not stop.is_set():
            self.app.models[0].batcher.submit(
                FeatureRow("m", float(self.sent), g[self.sent % len(g)])
            )
            self.sent += 1
            await asyncio.sleep(0.002)

    def factors(self) -> list[float]:
        """The score factor of every row sent, in order (1.0: the shipped model scored it)."""
        return [round(self.scored[i], 3) for i in range(self.sent)]


@contextlib.asynccontextmanager
async def serving(app: Appliance) -> AsyncIterator[Feed]:
    feed = Feed(app)
    batcher = app.models[0].batcher
    await batcher.start()
    stop = asyncio.Event()
    task = asyncio.create_task(feed.run(stop))
    try:
        yield feed
    finally:
        stop.set()
        await task
        await batcher.drain()
        await batcher.close()
        if app.models[0].previous is not None:
            app.models[0].previous.close()


async def send(ctx: Ctx, command: str, bodies: list[dict[str, Any]]) -> list[Reply]:
    handler = COMMANDS[command]
    replies = []
    for i, body in enumerate(bodies):
        replies.append(await handler(ctx, Request(command, f"req-{i}", body, time.time())))
    return replies


async def settle(feed: Feed, rows: int = 30) -> None:
    """Let ``rows`` more rows go through."""
    target = feed.sent + rows
    while len(feed.scored) < target:
        await asyncio.sleep(0.01)


def release(app: Appliance, ctx: Ctx, bodies: list[dict[str, Any]]) -> tuple[list[Reply], Feed]:
    """Send ``model.release`` (``bodies``, one request per chunk) while ``app`` scores rows:
    the replies and the rows scored before, during and after."""

    async def go() -> tuple[list[Reply], Feed]:
        async with serving(app) as feed:
            await settle(feed)
            replies = await send(ctx, "model.release", bodies)
            await settle(feed)
        return replies, feed

    return asyncio.run(go())


def assert_every_row_scored_once(feed: Feed) -> None:
    assert feed.duplicates == 0
    assert sorted(feed.scored) == list(range(feed.sent))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, str]:
    return make_keys(tmp_path / "keys")


def test_a_signed_release_swaps_the_model_between_two_batches_and_survives_a_restart(
    tmp_path: Path, keys: tuple[Path, str]
) -> None:
    priv, line = keys
    cfg = config(tmp_path, [line])
    app = Appliance(cfg)
    ctx = Ctx(app, cfg, tmp_path / "state")
    bodies = signed_bodies(make_bundle(tmp_path / "b", "1.1.0", factor=2.0), priv)
    assert len(bodies) > 2  # really chunked

    replies, feed = release(app, ctx, bodies)
    assert [r.code for r in replies[:-1]] == ["ok"] * (len(bodies) - 1)
    assert replies[-1].code == "ok", replies[-1].message
    assert replies[-1].body["version"] == "1.1.0" and replies[-1].body["previous"] == "1.0.0"
    assert_every_row_scored_once(feed)
    factors = feed.factors()
    switch = factors.index(2.0)
    assert set(factors[:switch]) == {1.0} and set(factors[switch:]) == {2.0}
    stats = app.stats()["models"]["cnc_anomaly"]
    assert stats["version"] == "1.1.0" and stats["release"]["swaps"] == 1
    store = ModelStore(tmp_path / "state")
    assert store.state("cnc_anomaly") == {"active": "1.1.0", "history": ["1.0.0", "1.1.0"]}
    assert not any((tmp_path / "state/models/staging").iterdir())
    # a restart serves the released version
    assert Appliance(cfg).models[0].bundle.version == "1.1.0"


def _bad_signature(bodies: list[dict[str, Any]], tmp_path: Path) -> None:
    sig = base64.b64decode(bodies[-1]["signature"])
    bodies[-1]["signature"] = base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode()


def _unknown_key(bodies: list[dict[str, Any]], tmp_path: Path) -> None:
    other, _ = make_keys(tmp_path / "other")
    key = rel.load_private_key(other)
    bodies[-1]["signature"] = base64.b64encode(key.sign(bodies[-1]["release"].encode())).decode()


def _wrong_hash(bodies: list[dict[str, Any]], tmp_path: Path) -> None:
    # a chunk replaced by other bytes with a matching chunk hash: only the signed bundle hash
    # can tell
    data = bytearray(base64.b64decode(bodies[1]["data"]))
    data[10] ^= 0xFF
    bodies[1]["data"] = base64.b64encode(bytes(data)).decode()
    bodies[1]["sha256_chunk"] = rel.sha256_hex(bytes(data))


def _truncated_chunk(bodies: list[dict[str, Any]], tmp_path: Path) -> None:
    data = base64.b64decode(bodies[1]["data"])
    bodies[1]["data"] = base64.b64encode(data[: len(data) // 2]).decode()


TAMPERED: dict[str, tuple[Callable[[list[dict[str, Any]], Path], None], str]] = {
    "bad signature": (_bad_signature, "not a valid Ed25519 signature"),
    "key not in the config": (_unknown_key, "not a valid Ed25519 signature"),
    "wrong bundle hash": (_wrong_hash, "does not match the signed"),
    "truncated chunk": (_truncated_chunk, "sha256 mismatch"),
}


@pytest.mark.parametrize("case", [*TAMPERED, "failing parity", "oversized"])
def test_a_tampered_release_is_refused_and_the_old_model_keeps_serving(
    case: str, tmp_path: Path, keys: tuple[Path, str]
) -> None:
    priv, line = keys
    cfg = config(tmp_path, [line], **({"max_model_bytes": 4096} if case == "oversized" else {}))
    app = Appliance(cfg)
    ctx = Ctx(app, cfg, tmp_path / "state")
    shift = 1.0 if case == "failing parity" else 0.0  # golden outputs altered, then re-signed
    bodies = signed_bodies(
        make_bundle(tmp_path / "b", "1.1.0", factor=2.0, golden_shift=shift), priv
    )
    if case in TAMPERED:
        TAMPERED[case][0](bodies, tmp_path)
    expected = {
        "failing parity": "fails its golden-vector parity check",
        "oversized": "downlink.max_model_bytes",
    }.get(case) or TAMPERED[case][1]

    replies, feed = release(app, ctx, bodies)
    refused = [r for r in replies if r.code == "refused"]
    assert refused and expected in refused[0].message, [r.message for r in replies]
    assert not [r for r in replies if r.code not in ("ok", "refused")]
    assert_every_row_scored_once(feed)
    assert set(feed.factors()) == {1.0}  # the old model scored every row
    stats = app.stats()["models"]["cnc_anomaly"]
    assert stats["version"] == "1.0.0" and stats["release"]["refused"] >= 1
    assert stats["release"]["last"].startswith("refused")
    staging = tmp_path / "state/models/staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert ModelStore(tmp_path / "state").state("cnc_anomaly")["active"] is None


def test_model_rollback_restores_the_previous_version_also_after_a_restart(
    tmp_path: Path, keys: tuple[Path, str]
) -> None:
    priv, line = keys
    cfg = config(tmp_path, [line])
    ctx = Ctx(Appliance(cfg), cfg, tmp_path / "state")
    v11 = signed_bodies(make_bundle(tmp_path / "b11", "1.1.0", factor=2.0), priv)
    v12 = signed_bodies(make_bundle(tmp_path / "b12", "1.2.0", factor=3.0), priv)

    async def go(app: Appliance, steps: list[tuple[str, list[dict[str, Any]]]]) -> Feed:
        ctx.appliance = app
        async with serving(app) as feed:
            await settle(feed)
            for command, bodies in steps:
                replies = await send(ctx, command, bodies)
                assert replies[-1].code == "ok", replies[-1].message
                await settle(feed)
        return feed

    rollback = ("model.rollback", [{"name": "cnc_anomaly"}])
    feed = asyncio.run(
        go(ctx.appliance, [("model.release", v11), ("model.release", v12), rollback])
    )
    assert_every_row_scored_once(feed)
    factors = [f for i, f in enumerate(feed.factors()) if i == 0 or f != feed.factors()[i - 1]]
    assert factors == [1.0, 2.0, 3.0, 2.0]
    store = ModelStore(tmp_path / "state")
    assert store.state("cnc_anomaly") == {"active": "1.1.0", "history": ["1.0.0", "1.1.0"]}
    # after a restart the rolled-back-to version serves, and a rollback loads 1.0.0 from disk
    app = Appliance(cfg)
    assert app.models[0].bundle.version == "1.1.0"
    feed = asyncio.run(go(app, [rollback]))
    assert_every_row_scored_once(feed)
    assert feed.factors()[0] == 2.0 and feed.factors()[-1] == 1.0
    assert Appliance(cfg).models[0].bundle.version == "1.0.0"
    replies = asyncio.run(send(ctx, "model.rollback", [{"name": "cnc_anomaly"}]))
    assert replies[0].code == "refused" and "no earlier" in replies[0].message


class FailsAfterParity(OrtEngine):
    """Test double of a model that passes its golden check, then raises at run time (a real
    GPU engine failing mid-run cannot be produced here): every call after the first fails."""

    def _infer_impl(self, batch: Any) -> Any:
        if self.stats.calls >= 1:
            raise RuntimeError("simulated device failure")
        return super()._infer_impl(batch)


def test_a_release_that_fails_at_run_time_is_rolled_back_without_losing_a_row(
    tmp_path: Path, keys: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    priv, line = keys
    plain = select.FACTORIES["onnxruntime-cpu"]

    def factory(bundle: Any, opts: select.EngineOptions) -> Any:
        if bundle.version != "6.6.6":
            return plain(bundle, opts)
        return FailsAfterParity(bundle, device="cpu", threads=1, **opts.engine_kwargs())

    monkeypatch.setitem(select.FACTORIES, "onnxruntime-cpu", factory)
    cfg = config(tmp_path, [line])
    app = Appliance(cfg)
    ctx = Ctx(app, cfg, tmp_path / "state")
    bodies = signed_bodies(make_bundle(tmp_path / "b", "6.6.6", factor=2.0), priv)

    replies, feed = release(app, ctx, bodies)
    assert replies[-1].code == "rolled_back", replies[-1].message
    assert "simulated device failure" in replies[-1].message
    assert_every_row_scored_once(feed)
    assert set(feed.factors()) == {1.0}
    stats = app.stats()["models"]["cnc_anomaly"]
    assert stats["version"] == "1.0.0" and stats["release"]["rolled_back"] == 1
    metrics = {
        s.labels["outcome"]: s.value
        for m in ApplianceCollector(app, lambda: ({}, {})).collect()
        if m.name == "appliance_model_releases"
        for s in m.samples
    }
    assert metrics == {"swapped": 1, "refused": 0, "rolled_back": 1}
    assert ModelStore(tmp_path / "state").state("cnc_anomaly")["active"] == "1.0.0"
    assert Appliance(cfg).models[0].bundle.version == "1.0.0"


def test_the_archive_is_canonical_and_a_pem_key_file_verifies(tmp_path: Path) -> None:
    a = make_bundle(tmp_path / "a", "2.0.0")
    b = make_bundle(tmp_path / "b", "2.0.0")
    (b / "notes.txt").write_text("not part of a release")
    assert rel.make_archive(a) == rel.make_archive(b)
    priv, _ = make_keys(tmp_path / "k")
    rel.sign_bundle(a, priv)
    key = rel.parse_public_key(str(tmp_path / "k/model-signing.pub"))
    statement, kid = rel.verify_statement(
        (a / "release.json").read_bytes(), (a / "release.sig").read_text(), [key]
    )
    assert statement.version == "2.0.0" and kid == rel.key_id(key)
    assert json.loads(statement.raw)["files"].keys() == {
        "manifest.json",
        "model.onnx",
        "golden.npz",
    }
    with pytest.raises(rel.ReleaseError, match="exists"):
        make_keys(tmp_path / "k")


def test_keygen_prints_the_key_line_the_config_takes_and_a_bad_line_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "keygen", "--out", str(tmp_path / "k")]) == 0
    found = re.search(r'"(ed25519:[^"]+)"', capsys.readouterr().out)
    assert found is not None
    assert config(tmp_path, [found.group(1)]).downlink.model_keys == (found.group(1),)
    assert (tmp_path / "k/model-signing.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match=r"downlink.model_keys\[0\]"):
        config(tmp_path, ["ed25519:AAAA"])
    # a PEM path is resolved against the config file's folder
    cfg = config(tmp_path, ["k/model-signing.pub"])
    assert cfg.downlink.model_keys == (str(tmp_path / "k/model-signing.pub"),)
