"""Pure parts of the local API: the [api] config section and the live view (last values and
sparkline history)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from appliance.api.live import LiveView
from appliance.config import parse_config
from appliance.contracts import Frame, Quality, ScoreBatch, Window
from appliance.errors import ConfigError

NO_DEVICES = {"appliance": {"allow_no_devices": True}}


def test_api_config_defaults_to_off_on_the_loopback_and_resolves_the_token_file(
    tmp_path: Path,
) -> None:
    cfg = parse_config(NO_DEVICES, base_dir=tmp_path)
    assert (cfg.api.enabled, cfg.api.listen, cfg.api.port, cfg.api.token_file) == (
        False,
        "127.0.0.1",
        8080,
        "",
    )
    cfg = parse_config(
        {**NO_DEVICES, "api": {"enabled": True, "token_file": "secrets/tok"}}, base_dir=tmp_path
    )
    assert cfg.api.token_file == str(tmp_path / "secrets" / "tok")


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"port": 0}, r"api\.port"),
        ({"max_body_bytes": 10}, r"api\.max_body_bytes"),
        ({"refresh_ms": 10}, r"api\.refresh_ms"),
        ({"tokenfile": "x"}, r"tokenfile"),
    ],
)
def test_bad_api_keys_are_config_errors_naming_the_key(
    section: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config({"api": section}, source="a.toml", base_dir=Path("."))


def frame(device: str, ch: list[int], values: list[float], ts: list[float], q: list[int]) -> Frame:
    return Frame(
        device,
        ("a", "b", "wave"),
        np.array(ts),
        np.array(ch, np.int32),
        np.array(values),
        np.array(q, np.uint8),
    )


def test_last_values_keep_the_last_sample_of_each_channel_with_its_quality() -> None:
    live = LiveView(history_s=10, window_s=1)
    live.on_frame(frame("m", [0, 1], [1.0, 2.0], [10.0, 10.0], [0, 0]))
    # a waveform block: many samples of one channel, and a STALE value of "b"
    live.on_frame(
        frame("m", [2, 2, 2, 1], [5.0, 6.0, 7.0, 2.0], [11.0, 11.1, 11.2, 11.0], [0, 0, 0, 1])
    )
    live.on_frame(frame("m", [], [], [], []))
    assert live.last_values("m") == {
        "a": {"value": 1.0, "quality": "good", "ts": 10.0},
        "b": {"value": 2.0, "quality": "stale", "ts": 11.0},
        "wave": {"value": 7.0, "quality": "good", "ts": 11.2},
    }
    live.on_frame(frame("m", [0], [math.nan], [12.0], [int(Quality.BAD)]))
    assert live.last_values("m")["a"] == {"value": None, "quality": "bad", "ts": 12.0}
    assert live.last_values("other") == {}


def window(end: float, channels: tuple[str, ...], means: list[float]) -> Window:
    n = len(channels)
    z = np.zeros(n)
    return Window("m", end - 1, end, channels, np.ones(n, np.int32), np.array(means), z, z, z, z)


def test_history_is_bounded_by_history_s_and_aligns_channels_that_come_and_go() -> None:
    live = LiveView(history_s=3, window_s=1)
    live.on_window(window(1.0, ("a",), [1.0]))
    live.on_window(window(2.0, ("a", "b"), [2.0, math.nan]))
    live.on_window(window(3.0, ("a", "b"), [3.0, 30.0]))
    live.on_window(window(4.0, ("a", "b"), [4.0, 40.0]))
    live.on_scores(
        ScoreBatch(
            ("m", "m"),
            np.array([3.0, 4.0]),
            np.array([0.5, math.inf], np.float32),
            "onnxruntime-cpu",
        )
    )
    h = live.history("m")
    assert h["t"] == [2.0, 3.0, 4.0]
    assert h["channels"] == {"a": [2.0, 3.0, 4.0], "b": [None, 30.0, 40.0]}
    assert h["score"] == {"t": [3.0, 4.0], "value": [0.5, None]}
    assert live.last_score("m") is None and live.last_score("x") is None


def test_ready_is_503_naming_the_engine_and_uplink_before_the_pipeline_has_started(
    tmp_path: Path,
) -> None:
    """The API comes up before the engine loads (a TensorRT build can take minutes): /health
    answers, /ready says why it is not ready yet."""
    import asyncio
    import json
    import urllib.error
    import urllib.request

    from appliance.demo.mosquitto import free_port
    from appliance.runtime import Appliance

    api_port, mqtt_port = free_port(), free_port()
    cfg = parse_config(
        {
            "devices": [{"name": "m", "profile": "cnc-sim", "port": free_port()}],
            "outbox": {"path": "o.sqlite"},
            "mqtt": {"port": mqtt_port},
            "api": {"enabled": True, "port": api_port},
        },
        base_dir=tmp_path,
    )
    app = Appliance(cfg)
    assert app.api is not None

    def get(path: str) -> tuple[int, object]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    async def go() -> tuple[tuple[int, object], tuple[int, object]]:
        assert app.api is not None
        await app.api.start()
        try:
            return await asyncio.to_thread(get, "/health"), await asyncio.to_thread(get, "/ready")
        finally:
            await app.api.stop()
            await app.api.stop()  # idempotent

    health, ready = asyncio.run(go())
    assert health == (200, {"status": "ok"})
    assert ready == (
        503,
        {
            "ready": False,
            "reasons": [
                "appliance is not running",
                "engine not loaded (model cnc_anomaly)",
                f"uplink not connected to 127.0.0.1:{mqtt_port}",
            ],
        },
    )
