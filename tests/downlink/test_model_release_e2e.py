"""Signed model releases end to end: simulated cell → appliance (command channel on) → real
Mosquitto ← requests from ``appliance cmd``'s client; telemetry read by a subscriber.

The released version multiplies the shipped model's score by 0 (``release_kit.make_bundle``):
every window it scores carries ``scores.cnc_anomaly == 0.0`` in its telemetry, while the
shipped model's scores are never exactly 0, so the telemetry shows which version scored."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from dlhelp import DownlinkCell
from release_kit import make_bundle, make_keys, signed_bodies

from appliance.cli import main
from appliance.demo.subscriber import DemoSubscriber
from appliance.downlink.schemas import load_cmd_schema
from appliance.modelkit.release import load_private_key, sha256_hex

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def scores(sub: DemoSubscriber) -> list[float]:
    with sub.lock:
        return [
            m["scores"]["cnc_anomaly"]
            for m in sub.messages
            if m["kind"] == "telemetry" and "cnc_anomaly" in m.get("scores", {})
        ]


def wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def send_all(cell: DownlinkCell, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Send the chunks in order; the first reply that is not ``ok``, else the last."""
    reply: dict[str, Any] = {}
    for body in bodies:
        reply = cell.send("model.release", body)
        jsonschema.validate(reply, load_cmd_schema("reply"))
        if reply["code"] != "ok":
            break
    return reply


def test_signed_releases_swap_without_a_lost_window_tampered_ones_are_refused_and_rollback_works(
    tmp_path: Path, downlink_cell_factory: Callable[..., DownlinkCell]
) -> None:
    priv, line = make_keys(tmp_path / "keys")
    other, _ = make_keys(tmp_path / "other-keys")  # a key the appliance does not know
    cell = downlink_cell_factory({"downlink": {"model_keys": [line]}})
    sub = DemoSubscriber("127.0.0.1", cell.broker.port, "edge", "dl", client_id="rel-sub")
    sub.keep_messages = True
    sub.start()
    try:
        wait(lambda: len(scores(sub)) >= 3, 30, "telemetry with scores")

        def tampered(how: str) -> list[dict[str, Any]]:
            shift = 1.0 if how == "failing parity" else 0.0
            b = make_bundle(
                tmp_path / how.replace(" ", "_"), "1.1.0", factor=0.0, golden_shift=shift
            )
            bodies = signed_bodies(b, priv)
            if how == "bad signature":
                sig = bytearray(base64.b64decode(bodies[-1]["signature"]))
                sig[0] ^= 1
                bodies[-1]["signature"] = base64.b64encode(bytes(sig)).decode()
            elif how == "unknown key":
                key = load_private_key(other)
                sig = key.sign(bodies[-1]["release"].encode())
                bodies[-1]["signature"] = base64.b64encode(sig).decode()
            elif how == "wrong hash":
                data = bytearray(base64.b64decode(bodies[0]["data"]))
                data[-1] ^= 0xFF
                bodies[0]["data"] = base64.b64encode(bytes(data)).decode()
                bodies[0]["sha256_chunk"] = sha256_hex(bytes(data))
            elif how == "truncated chunk":
                data = base64.b64decode(bodies[0]["data"])
                bodies[0]["data"] = base64.b64encode(data[:-100]).decode()
            return bodies

        expected = {
            "bad signature": "not a valid Ed25519 signature",
            "unknown key": "not a valid Ed25519 signature",
            "wrong hash": "does not match the signed",
            "truncated chunk": "sha256 mismatch",
            "failing parity": "fails its golden-vector parity check",
        }
        for how, why in expected.items():
            reply = send_all(cell, tampered(how))
            assert reply["code"] == "refused" and why in reply["message"], (how, reply)
        seen = len(scores(sub))
        wait(lambda: len(scores(sub)) >= seen + 3, 20, "telemetry after the refusals")
        assert 0.0 not in scores(sub)  # the shipped model scored every window so far

        # a good release, sent with `appliance cmd ... model.release --bundle`
        good = make_bundle(tmp_path / "good", "1.1.0", factor=0.0)
        assert main(["model", "sign", str(good), "--key", str(priv)]) == 0
        argv = ["cmd", "-c", str(cell.config_path), "model.release", "--bundle", str(good)]
        assert main([*argv, "--chunk-bytes", "2048"]) == 0
        status = cell.send("status", {})["body"]["engine"]["model"]
        assert status["version"] == "1.1.0" and status["release"]["swaps"] == 1
        assert status["release"]["refused"] >= len(expected)
        seen = len(scores(sub))
        wait(lambda: len(scores(sub)) >= seen + 3, 20, "telemetry after the release")
        after = scores(sub)
        first_zero = after.index(0.0)
        assert all(s != 0.0 for s in after[:first_zero])
        assert all(s == 0.0 for s in after[first_zero:])  # from one window on, the new version

        reply = cell.send("model.rollback", {"name": "cnc_anomaly"})
        assert reply["code"] == "ok" and reply["body"]["version"] == "1.0.0", reply
        seen = len(scores(sub))
        wait(lambda: len(scores(sub)) >= seen + 3, 20, "telemetry after the rollback")
        assert scores(sub)[-1] != 0.0
        stats = cell.stats()["models"]["cnc_anomaly"]
    finally:
        cell.call(cell.runner.stop())
        sub.stop()
    assert stats["version"] == "1.0.0" and stats["release"]["rolled_back"] == 1
    b = cell.on_loop(lambda: cell.app.models[0].batcher.stats())
    # every window that reached the batcher was scored exactly once: none dropped, none failed
    assert b["dropped"] == 0 and b["errors"] == 0
    assert b["rows_scored"] == b["submitted"] and b["queued"] == 0
    summary = sub.summary()
    assert summary["gaps"] == 0 and summary["duplicates"] == 0
