"""TLS and authentication of the MQTT uplink against a real Mosquitto broker.

The broker keeps its plain listener (for the test's subscriber) and gets a second, TLS listener
with certificates from a throw-away PKI made by ``openssl`` (see ``mqtt_helpers.make_pki``);
passwords live in a real ``mosquitto_passwd`` file.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Mosquitto, free_port
from mqtt_helpers import (
    APP,
    PREFIX,
    Pki,
    Subscriber,
    await_condition,
    eventually,
    make_pki,
    mqtt_cfg,
    outbox,
    run_with_uplink,
    telemetry,
    tls_listener_conf,
)

from appliance.config import Config, MqttSection, config_to_toml_dict, parse_config
from appliance.errors import ConfigError
from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink

__all__ = ["outbox"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.broker, pytest.mark.timeout(30)]

SECRET = "s3cr3t-Pa55-do-not-log"
USER = "cell01"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(mosquitto: Mosquitto, pki: Pki) -> Iterator[int]:
    """The broker with a TLS listener (server certificate only); yields its port."""
    port = free_port()
    mosquitto.reconfigure(tls_listener_conf(port, pki))
    yield port


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def tls_refused(
    up: MqttUplink,
    caplog: pytest.LogCaptureFixture,
    *,
    failures: int = 2,
    level: int = logging.INFO,
) -> list[str]:
    """Run ``up`` until ``failures`` TLS failures, never connected (the uplink's log captured
    from ``level``); the ERROR lines it logged."""

    async def scenario(u: MqttUplink) -> None:
        await eventually(lambda: u.stats()["tls_failures"] >= failures)
        assert not u.connected

    with caplog.at_level(level, logger="appliance.uplink"):
        run_with_uplink(up, scenario, stop_s=0.1)
    return errors(caplog)


def assert_start_fails(cfg: MqttSection, ob: SqliteOutbox, key: str) -> None:
    """``start()`` of an uplink with ``cfg`` raises a :class:`ConfigError` naming ``key``."""

    async def main() -> None:
        with pytest.raises(ConfigError, match=key):
            await MqttUplink(cfg, APP, ob).start()

    asyncio.run(main())


def deliver_one(up: MqttUplink, ob: SqliteOutbox, sub: Subscriber) -> Any:
    """A scenario: wait for the connection, append one record, wait until the subscriber has it."""

    async def scenario(_: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        ob.append([telemetry(i=7)])
        up.notify()
        await eventually(lambda: ob.pending == 0)
        await eventually(lambda: len(sub.messages()) == 1)

    return scenario


# -- TLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_tls_with_the_broker_ca_verifies_the_certificate_and_delivers(
    mosquitto: Mosquitto, tls_broker: int, pki: Pki, outbox: SqliteOutbox, protocol: str
) -> None:
    cfg = mqtt_cfg(tls_broker, tls=True, ca_file=str(pki.ca), protocol=protocol)
    uplink = MqttUplink(cfg, APP, outbox)
    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        run_with_uplink(uplink, deliver_one(uplink, outbox, sub))
        assert [m["i"] for m in sub.messages()] == [7]
    assert uplink.stats()["tls_failures"] == 0


def test_a_tls_backlog_drains_completely_with_acks_arriving_in_batches(
    mosquitto: Mosquitto, tls_broker: int, pki: Pki, outbox: SqliteOutbox
) -> None:
    """With paho on the event loop, TLS reads go through the loop's reader callback: a backlog
    whose PUBACKs arrive many per TLS record must drain completely and in order."""
    cfg = mqtt_cfg(tls_broker, tls=True, ca_file=str(pki.ca), max_inflight=100)
    uplink = MqttUplink(cfg, APP, outbox)
    outbox.append([telemetry(i=i) for i in range(2000)])

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: outbox.pending == 0, timeout_s=20)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        run_with_uplink(uplink, scenario)
        await_condition(lambda: len(sub.messages()) == 2000)
        assert [m["i"] for m in sub.messages()] == list(range(2000))
    assert uplink.stats()["published"] == 2000


@pytest.mark.parametrize("ca", ["system store", "unrelated CA"])
def test_tls_without_the_broker_ca_fails_verification_with_one_clear_error_and_keeps_retrying(
    tls_broker: int, pki: Pki, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture, ca: str
) -> None:
    ca_file = "" if ca == "system store" else str(pki.other_ca)
    uplink = MqttUplink(mqtt_cfg(tls_broker, tls=True, ca_file=ca_file), APP, outbox)
    errs = tls_refused(uplink, caplog, failures=3, level=logging.DEBUG)
    assert len(errs) == 1, errs
    assert f"127.0.0.1:{tls_broker}" in errs[0]
    assert "TLS certificate verification failed" in errs[0]
    assert "mqtt.ca_file" in errs[0]
    assert uplink.stats()["connects"] == 0


def test_a_certificate_for_another_host_name_fails_the_host_name_check(
    mosquitto: Mosquitto, pki: Pki, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    mosquitto.reconfigure(tls_listener_conf(port, pki, misnamed=True))
    uplink = MqttUplink(mqtt_cfg(port, tls=True, ca_file=str(pki.ca)), APP, outbox)
    errs = tls_refused(uplink, caplog)
    assert len(errs) == 1 and "mismatch" in errs[0] and "'127.0.0.1'" in errs[0], errs


def test_tls_insecure_connects_to_an_unverified_broker_but_warns_loudly(
    tls_broker: int, pki: Pki, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = mqtt_cfg(tls_broker, tls=True, ca_file=str(pki.other_ca), tls_insecure=True)
    uplink = MqttUplink(cfg, APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)

    with caplog.at_level(logging.INFO, logger="appliance.uplink"):
        run_with_uplink(uplink, scenario)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("tls_insecure = true" in w and "NOT verified" in w for w in warnings)


def test_a_client_certificate_is_presented_where_the_broker_requires_one(
    mosquitto: Mosquitto, pki: Pki, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    mosquitto.reconfigure(tls_listener_conf(port, pki, require_certificate=True))
    with_cert = mqtt_cfg(
        port,
        tls=True,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    uplink = MqttUplink(with_cert, APP, outbox)
    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        run_with_uplink(uplink, deliver_one(uplink, outbox, sub))
        assert len(sub.messages()) == 1

    without = MqttUplink(mqtt_cfg(port, tls=True, ca_file=str(pki.ca)), APP, outbox)
    errs = tls_refused(without, caplog)
    assert len(errs) == 1 and f"127.0.0.1:{port}" in errs[0] and "TLS" in errs[0], errs


def test_an_unreadable_ca_file_fails_start_naming_the_key(
    tmp_path: Path, outbox: SqliteOutbox
) -> None:
    cfg = mqtt_cfg(1, tls=True, ca_file=str(tmp_path / "missing.crt"))
    assert_start_fails(cfg, outbox, "mqtt.ca_file")


# -- passwords ---------------------------------------------------------------------------------


def passwd_broker(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Require a password for every client: ``USER`` / ``SECRET`` and ``sub`` / ``sub``."""
    pw = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), USER, SECRET], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "sub", "sub"], check=True)
    mosquitto.reconfigure(f"password_file {pw}\n", allow_anonymous=False)


def password_subscriber(port: int) -> Subscriber:
    """A subscriber to the telemetry, logged in as ``sub`` (see :func:`passwd_broker`)."""
    return Subscriber(port, f"{PREFIX}/{APP}/telemetry/#", username="sub", password="sub")


def password_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mqtt-password"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_right_password_from_a_file_delivers_and_never_appears_in_logs_or_config(
    mosquitto: Mosquitto,
    tmp_path: Path,
    outbox: SqliteOutbox,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    passwd_broker(mosquitto, tmp_path)
    pw = password_file(tmp_path, SECRET)
    cfg = mqtt_cfg(mosquitto.port, username=USER, password_file=str(pw), protocol=protocol)
    uplink = MqttUplink(cfg, APP, outbox)
    sub = password_subscriber(mosquitto.port)
    with sub, caplog.at_level(logging.DEBUG):
        run_with_uplink(uplink, deliver_one(uplink, outbox, sub))
    assert uplink.stats()["auth_failures"] == 0
    assert SECRET not in caplog.text
    assert SECRET not in repr(cfg) and SECRET not in repr(uplink.__dict__)
    full = Config(mqtt=cfg)
    assert SECRET not in repr(full) and SECRET not in str(config_to_toml_dict(full))


def test_a_password_from_an_environment_variable_delivers(
    mosquitto: Mosquitto, tmp_path: Path, outbox: SqliteOutbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    passwd_broker(mosquitto, tmp_path)
    monkeypatch.setenv("APPLIANCE_MQTT_PASSWORD", SECRET)
    cfg = mqtt_cfg(mosquitto.port, username=USER, password_env="APPLIANCE_MQTT_PASSWORD")
    uplink = MqttUplink(cfg, APP, outbox)
    with password_subscriber(mosquitto.port) as sub:
        run_with_uplink(uplink, deliver_one(uplink, outbox, sub))
        assert len(sub.messages()) == 1


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_wrong_password_logs_one_clear_error_counts_retries_and_recovers_once_corrected(
    mosquitto: Mosquitto,
    tmp_path: Path,
    outbox: SqliteOutbox,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    passwd_broker(mosquitto, tmp_path)
    wrong = "wrong-" + SECRET
    pw = password_file(tmp_path, wrong)
    cfg = mqtt_cfg(mosquitto.port, username=USER, password_file=str(pw), protocol=protocol)
    uplink = MqttUplink(cfg, APP, outbox)
    outbox.append([telemetry(i=1)])

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.stats()["auth_failures"] >= 3)
        assert not up.connected and outbox.pending == 1
        password_file(tmp_path, SECRET)  # corrected on disk: read again before the next try
        await eventually(lambda: up.connected)
        await eventually(lambda: outbox.pending == 0)
        await eventually(lambda: len(sub.messages()) == 1)

    sub = password_subscriber(mosquitto.port)
    with sub, caplog.at_level(logging.DEBUG):
        run_with_uplink(uplink, scenario)
    errs = errors(caplog)
    assert len(errs) == 1, errs
    assert f"127.0.0.1:{mosquitto.port}" in errs[0]
    assert "not authorised: check mqtt.username / password_file" in errs[0]
    assert SECRET not in caplog.text and wrong not in caplog.text
    assert uplink.stats()["connects"] == 1


def test_a_missing_password_file_fails_start_naming_the_key_not_the_value(
    tmp_path: Path, outbox: SqliteOutbox
) -> None:
    cfg = mqtt_cfg(1, username=USER, password_file=str(tmp_path / "nope"))
    assert_start_fails(cfg, outbox, "mqtt.password_file")


def test_a_group_readable_password_file_gets_a_warning(
    tmp_path: Path, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    pw = password_file(tmp_path, SECRET)
    pw.chmod(0o644)
    uplink = MqttUplink(mqtt_cfg(free_port(), username=USER, password_file=str(pw)), APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="appliance.uplink"):
        run_with_uplink(uplink, scenario, stop_s=0.1)
    assert "chmod 600" in caplog.text and SECRET not in caplog.text


# -- config ------------------------------------------------------------------------------------


def parse_mqtt(section: dict[str, Any]) -> MqttSection:
    return parse_config(
        {"appliance": {"allow_no_devices": True}, "mqtt": section},
        source="t.toml",
        base_dir=Path("/"),
    ).mqtt


def test_an_inline_password_in_the_toml_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="password") as err:
        parse_mqtt({"username": USER, "password": SECRET})
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"cert_file": "/c.pem", "key_file": "/k.pem"}, "needs mqtt.tls = true"),
        ({"tls": True, "cert_file": "/c.pem"}, "go together"),
        ({"tls_insecure": True}, "needs mqtt.tls = true"),
        ({"password_file": "/p"}, "mqtt.username is required"),
        ({"username": "u", "password_file": "/p", "password_env": "P"}, "not both"),
        ({"password_env": "1BAD"}, "password_env"),
        ({"backlog_rate_per_s": -1}, "backlog_rate_per_s"),
        ({"max_packet_bytes": 100}, "mqtt.max_packet_bytes = 100 is below 1024"),
        ({"max_packet_bytes": -1}, "max_packet_bytes"),
    ],
)
def test_mqtt_security_settings_are_checked_at_load(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_mqtt(section)


def test_relative_tls_and_password_paths_resolve_against_the_config_directory() -> None:
    cfg = parse_config(
        {
            "appliance": {"allow_no_devices": True},
            "mqtt": {
                "tls": True,
                "ca_file": "certs/ca.pem",
                "username": "u",
                "password_file": "/etc/appliance/mqtt.pass",
            },
        },
        source="t.toml",
        base_dir=Path("/etc/appliance"),
    ).mqtt
    assert cfg.ca_file == "/etc/appliance/certs/ca.pem"
    assert cfg.password_file == "/etc/appliance/mqtt.pass"


def test_the_defaults_verify_certificates_once_tls_is_on() -> None:
    cfg = parse_mqtt({"tls": True, "port": 8883})
    assert (cfg.tls, cfg.tls_insecure, cfg.ca_file) == (True, False, "")
    assert msgspec.structs.asdict(cfg)["session_expiry_s"] == 86400
