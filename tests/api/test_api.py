"""Every endpoint of the local API against a running appliance fed by the simulated cell, with a
real Mosquitto broker: the JSON views, /metrics, the token rules and bad requests."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_fixtures import TOKEN, RunningCell
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCell]:
    with RunningCell(tmp_path_factory.mktemp("api")) as rc:
        rc.wait_ready(scored=True)
        yield rc


def metrics(cell: RunningCell) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every exposed sample, by sample name (``_total``, ``_bucket`` ... included)."""
    status, headers, body = cell.request("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def metrics_bad(cell: RunningCell) -> dict[str, float]:
    return {
        lab["reason"]: v for lab, v in metrics(cell).get("appliance_api_bad_requests_total", [])
    }


def raw_request(cell: RunningCell, request_line: str) -> tuple[int, bytes]:
    """Send ``request_line`` byte for byte (no client normalises the path)."""
    with socket.create_connection(("127.0.0.1", cell.api_port), timeout=5) as s:
        s.sendall(f"{request_line}\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_health_and_ready_answer_200_when_engine_outbox_and_uplink_are_up(
    cell: RunningCell,
) -> None:
    assert cell.get_json("/health") == {"status": "ok"}
    assert cell.get_json("/ready") == {"ready": True, "reasons": []}


def test_devices_show_state_last_values_with_quality_and_stats(cell: RunningCell) -> None:
    devices = cell.get_json("/api/v1/devices")["devices"]
    assert [d["name"] for d in devices] == ["cnc-1", "cnc-2"]
    for d in devices:
        assert d["state"] == "online" and d["protocol"] == "modbus_tcp"
        assert d["stats"]["polls"] > 0 and d["stats"]["errors"] == 0
        temp = d["values"]["spindle_temp"]
        assert temp["quality"] == "good" and 10.0 < temp["value"] < 120.0
        assert "spindle_temp" in d["main_channels"]


def test_one_device_carries_its_recent_history_and_an_unknown_one_is_404(
    cell: RunningCell,
) -> None:
    d = cell.get_json("/api/v1/devices/cnc-2")
    h = d["history"]
    assert d["name"] == "cnc-2" and len(h["t"]) >= 2
    assert len(h["channels"]["spindle_temp"]) == len(h["t"])
    assert h["t"] == sorted(h["t"]) and len(h["score"]["value"]) > 0
    body = cell.get_json("/api/v1/devices/cnc-9", expect=404)
    assert body["reason"] == "unknown_device" and "cnc-9" in body["error"]


def test_engine_reports_backend_model_and_latency(cell: RunningCell) -> None:
    e = cell.get_json("/api/v1/engine")
    assert e["model"]["name"] == "cnc_anomaly" and e["loaded"] is True
    assert e["backend"] == cell.app.engine.backend == "onnxruntime-cpu"
    chain = {c["backend"]: c for c in e["chain"]}
    assert chain["onnxruntime-cpu"]["state"] == "serving"
    assert chain["tensorrt"]["state"] == "absent" and chain["tensorrt"]["reason"]
    (cpu,) = e["backends"]
    assert e["rows"] == cpu["rows"] > 0
    assert sum(cpu["latency_ms_histogram"]["counts"]) == cpu["calls"] == e["calls"]


def test_status_is_the_whole_picture_and_history_since_returns_only_newer_points(
    cell: RunningCell,
) -> None:
    st = cell.get_json("/api/v1/status?history_since=0")
    assert st["appliance"]["id"] == "api-test" and st["ready"] is True
    assert st["uplink"]["connected"] is True and st["outbox"]["pending"] >= 0
    last = max(t for d in st["devices"] for t in d["history"]["t"])
    newer = cell.get_json(f"/api/v1/status?history_since={last}")
    assert all(t > last for d in newer["devices"] for t in d["history"]["t"])
    assert "history" not in cell.get_json("/api/v1/status")["devices"][0]
    bad = cell.get_json("/api/v1/status?history_since=yesterday", expect=400)
    assert bad["reason"] == "bad_parameter"


def test_metrics_expose_the_stages_counters(cell: RunningCell) -> None:
    m = metrics(cell)
    stats = cell.call(cell.app.stats)
    polls = {lab["device"]: v for lab, v in m["appliance_device_polls_total"]}
    assert set(polls) == {"cnc-1", "cnc-2"}
    for d in stats["acquisition"]:  # read after the scrape: never fewer
        assert 0 < polls[d["device"]] <= d["polls"]
    assert m["appliance_device_up"] == [({"device": "cnc-1"}, 1.0), ({"device": "cnc-2"}, 1.0)]
    jitter_inf = [
        v
        for lab, v in m["appliance_device_poll_jitter_seconds_bucket"]
        if lab["le"] == "+Inf" and lab["device"] == "cnc-1"
    ]
    assert jitter_inf and jitter_inf[0] > 0
    latency = m["appliance_inference_latency_seconds_count"]
    assert latency[0][0] == {"backend": cell.app.engine.backend, "model": "cnc_anomaly"}
    assert latency[0][1] > 0
    for name in (
        "appliance_windows_closed_total",
        "appliance_batcher_batches_total",
        "appliance_alerts_raised_total",
        "appliance_outbox_pending",
        "appliance_outbox_oldest_age_seconds",
        "appliance_outbox_evicted_total",
        "appliance_outbox_coarsened_total",
        "appliance_mqtt_published_total",
    ):
        assert name in m, name
    assert m["appliance_mqtt_connected"] == [({}, 1.0)]
    assert m["appliance_mqtt_published_total"][0][1] > 0


def ack(cell: RunningCell, body: bytes, token: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    status, _, raw = cell.request("/api/v1/alerts/ack", method="POST", body=body, headers=headers)
    return status, json.loads(raw)


def test_an_injected_fault_shows_as_an_active_alert_that_only_the_token_can_acknowledge(
    cell: RunningCell,
) -> None:
    cell.call(lambda: cell.cell.inject(0, "temp_ramp", 6.0))
    cell.wait_for(lambda: cell.get_json("/api/v1/alerts")["active"], 20, "the alert")
    (alert,) = cell.get_json("/api/v1/alerts")["active"]
    assert (alert["rule"], alert["machine"], alert["severity"]) == (
        "spindle_overtemp",
        "cnc-1",
        "major",
    )
    assert alert["acknowledged"] is False
    body = json.dumps({"alert_id": alert["alert_id"]}).encode()
    status, answer = ack(cell, body, None)
    assert status == 401 and answer["reason"] == "unauthorized"
    status, answer = ack(cell, body, "not-the-token")
    assert status == 403 and answer["reason"] == "forbidden"
    assert cell.get_json("/api/v1/alerts")["active"][0]["acknowledged"] is False
    status, answer = ack(cell, body, TOKEN)
    assert status == 200 and answer == {"alert_id": alert["alert_id"], "acknowledged": True}
    assert cell.get_json("/api/v1/alerts")["active"][0]["acknowledged"] is True
    status, answer = ack(cell, b'{"alert_id": "no-such-alert"}', TOKEN)
    assert status == 404 and answer["reason"] == "unknown_alert"
    m = metrics(cell)
    assert [v for _, v in m["appliance_alerts_active"]] == [1.0]


def test_bad_requests_get_a_clean_4xx_are_counted_and_leave_the_appliance_running(
    cell: RunningCell,
) -> None:
    polls_before = cell.call(lambda: cell.app.acquisition.stats()[0]["polls"])
    assert cell.get_json("/no/such/thing", expect=404)["reason"] == "not_found"
    traversal_before = metrics_bad(cell).get("path_traversal", 0)
    statuses = []
    for line in (
        "GET /../../etc/passwd HTTP/1.1",
        "GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1",
        "GET /api/v1/devices/..%2f..%2fetc%2fpasswd HTTP/1.1",
        "GET /api/v1/devices/../../../etc/passwd HTTP/1.1",
        "GET /static/..\\..\\etc\\passwd HTTP/1.1",
    ):
        status, body = raw_request(cell, line)
        statuses.append(status)
        assert b"root:" not in body and b"daemon:" not in body
    assert statuses == [404] * 5
    assert metrics_bad(cell)["path_traversal"] == traversal_before + 5
    status, answer = ack(cell, b"{not json", TOKEN)
    assert status == 400 and answer["reason"] == "malformed_json"
    status, answer = ack(cell, b'{"alert_id": "' + b"x" * 10_000 + b'"}', TOKEN)
    assert status == 413 and answer["reason"] == "body_too_large"
    status, answer = ack(cell, b"[1, 2]", TOKEN)
    assert status == 400 and answer["reason"] == "bad_parameter"
    status, _, raw = cell.request("/api/v1/devices", method="DELETE")
    assert status == 405 and json.loads(raw)["reason"] == "method_not_allowed"
    bad = {lab["reason"]: v for lab, v in metrics(cell)["appliance_api_bad_requests_total"]}
    for reason in ("not_found", "path_traversal", "malformed_json", "body_too_large"):
        assert bad.get(reason, 0) >= 1, (reason, bad)
    assert bad["method_not_allowed"] >= 1
    assert cell.get_json("/health") == {"status": "ok"}
    cell.wait_for(
        lambda: cell.call(lambda: cell.app.acquisition.stats()[0]["polls"]) > polls_before + 5,
        10,
        "polling goes on",
    )


def test_the_status_page_is_one_self_contained_file(cell: RunningCell) -> None:
    status, headers, body = cell.request("/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "<script src" not in page and '<link rel="stylesheet"' not in page
    external = [u for u in ("http://", "https://", "//cdn") if u in page.replace(_SVG_NS, "")]
    assert external == []
    assert 'name="viewport"' in page


_SVG_NS = "http://www.w3.org/2000/svg"


def test_ready_is_503_with_the_reason_while_the_broker_is_down(cell: RunningCell) -> None:
    cell.broker.stop()
    try:
        cell.wait_for(lambda: not cell.call(lambda: cell.app.uplink.connected), 15, "disconnect")
        body = cell.get_json("/ready", expect=503)
        assert body["ready"] is False
        assert body["reasons"] == [f"uplink not connected to 127.0.0.1:{cell.broker.port}"]
        assert cell.get_json("/health") == {"status": "ok"}
    finally:
        cell.broker.start()
    cell.wait_for(lambda: cell.request("/ready")[0] == 200, 20, "ready again")


def test_a_state_change_without_a_configured_token_file_is_refused(tmp_path: Path) -> None:
    import asyncio

    from appliance.api import ApiServer
    from appliance.config import ApiSection
    from appliance.demo.mosquitto import free_port
    from appliance.errors import ConfigError

    server = ApiServer(
        ApiSection(enabled=True, port=free_port(), token_file=str(tmp_path / "x")), app=None
    )  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"api.token_file: cannot read .*x"):
        asyncio.run(server.start())


def test_appliance_status_prints_the_picture_from_a_url_or_a_config_file(
    cell: RunningCell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from appliance.cli import main

    assert main(["status", "--url", cell.base + "/"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("api-test  v") and "READY" in out
    assert "cnc-1" in out and "online" in out and "spindle_temp=" in out
    assert "connected" in out and "cnc_anomaly" in out
    conf = tmp_path / "appliance.toml"
    conf.write_text(
        "[appliance]\nallow_no_devices = true\n"
        f'[api]\nenabled = true\nlisten = "0.0.0.0"\nport = {cell.api_port}\n'
    )
    assert main(["status", "-c", str(conf), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["appliance"]["id"] == "api-test"
    conf.write_text("[appliance]\nallow_no_devices = true\n[api]\nenabled = false\n")
    assert main(["status", "-c", str(conf)]) == 2
    assert "api.enabled is false" in capsys.readouterr().err


def test_appliance_status_exits_1_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main
    from appliance.demo.mosquitto import free_port

    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "no answer from" in capsys.readouterr().out
