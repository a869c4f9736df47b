"""Sending one command and waiting for its reply: ``appliance cmd`` and the tests.

:func:`send_command` subscribes the reply topic of a fresh (or given) request id, publishes
the request with QoS 1 and waits for the reply. It runs paho's network thread for the time of
one command (a command-line tool, not the appliance's event loop).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.uplink.topics import command_topic, reply_topic

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
OK_CODES = ("ok", "accepted")


class CommandTimeout(Exception):
    """No reply within the timeout."""


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    prefix: str = "edge"
    protocol: str = "5"
    username: str = ""
    password: str | None = None
    tls: ssl.SSLContext | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex


def send_command(
    broker: Broker,
    appliance_id: str,
    command: str,
    body: dict[str, Any] | None = None,
    *,
    request_id: str | None = None,
    timeout_s: float = 30.0,
    payload: bytes | None = None,
) -> dict[str, Any]:
    """Publish ``{"request_id", "body"}`` on ``<prefix>/<appliance>/cmd/<command>`` and return
    the decoded reply. ``payload`` replaces the request's bytes (tests). Raises
    :class:`CommandTimeout` or ``OSError`` (broker unreachable)."""
    rid = request_id or new_request_id()
    v5 = broker.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"appliance-cmd-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls is not None:
        client.tls_set_context(broker.tls)
    got: list[dict[str, Any]] = []
    done = threading.Event()
    subscribed = threading.Event()
    topic = reply_topic(broker.prefix, appliance_id, rid)

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(doc, dict) and doc.get("request_id") == rid:
            got.append(doc)
            done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        end = time.monotonic() + timeout_s
        if not subscribed.wait(timeout_s):
            raise CommandTimeout(f"the broker did not confirm the subscription to {topic}")
        data = payload
        if data is None:
            data = json.dumps({"request_id": rid, "body": body or {}}).encode()
        props = None
        if v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.PayloadFormatIndicator = 1
            props.ContentType = "application/json"
        client.publish(
            command_topic(broker.prefix, appliance_id, command), data, qos=1, properties=props
        )
        if not done.wait(max(0.0, end - time.monotonic())):
            raise CommandTimeout(f"no reply to {command} {rid} within {timeout_s} s")
        return got[0]
    finally:
        client.loop_stop()
        client.disconnect()


CMD_HELP = """\
Send one command to an appliance over MQTT and print its reply (docs/mqtt.md, "Commands").

The broker, topic prefix and appliance id come from the config file ([mqtt] host, port,
topic_prefix, protocol, tls, ca_file; [appliance] id); --broker and --appliance override them.
The request gets a fresh request id; the reply (JSON) is printed on stdout.

Commands of this appliance: status, config.apply, rules.apply, alerts.ack, and those of the
other handler modules (model.release, model.rollback, device.write, backfill). The body is the
command's request body (appliance/schemas/cmd/<command>.request.json), e.g.
  appliance cmd -c appliance.toml alerts.ack --body '{"alert_id": "overtemp:cnc-1:1700000000000"}'
  appliance cmd -c appliance.toml config.apply --body-file new.json
  appliance cmd -c appliance.toml device.write --body '{"device":"cnc-1","address":40,"value":8}'
  appliance cmd -c appliance.toml backfill --body '{"from": 1700000000, "to": 1700003600}'
A signed model bundle (appliance model sign) is sent with --bundle instead of a body: split
into chunks of --chunk-bytes, one model.release request each; the last reply is printed:
  appliance cmd -c appliance.toml model.release --bundle ./cnc_anomaly-1.1.0

Credentials: --username, with the password from the environment variable --password-env
(never on the command line). Exit 0 on ok/accepted, 1 on refused/error/rolled_back,
2 on a timeout or a usage error."""


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML config file")
    sp.add_argument("cmd_command", metavar="COMMAND", help="the command, e.g. status")
    body = sp.add_mutually_exclusive_group()
    body.add_argument("--body", metavar="JSON", help="the request body, a JSON object")
    body.add_argument("--body-file", metavar="F", help="read the request body (JSON) from F")
    body.add_argument(
        "--bundle",
        metavar="DIR",
        help="model.release: the signed bundle folder (release.json and release.sig in it)",
    )
    sp.add_argument(
        "--chunk-bytes",
        type=int,
        default=128 * 1024,
        metavar="N",
        help="model.release --bundle: archive bytes per request (default 131072)",
    )
    sp.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="seconds to wait (default 30)"
    )
    sp.add_argument("--broker", metavar="HOST:PORT", help="override [mqtt] host and port")
    sp.add_argument("--appliance", metavar="ID", help="override [appliance] id")
    sp.add_argument("--username", default="", help="MQTT user name (default: none)")
    sp.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the password"
    )


def run(args: argparse.Namespace) -> int:
    import os

    from appliance.config import load_config
    from appliance.uplink.tls import tls_context

    def usage(text: str) -> int:
        print(f"appliance cmd: {text}", file=sys.stderr)
        return EXIT_USAGE

    cfg = load_config(args.config)
    bodies: list[dict[str, Any]] = []
    try:
        if args.bundle:
            from appliance.modelkit.release import ReleaseError, release_bodies

            if args.cmd_command != "model.release":
                return usage("--bundle goes with model.release")
            try:
                bodies = release_bodies(Path(args.bundle), chunk_bytes=args.chunk_bytes)
            except ReleaseError as err:
                return usage(str(err))
            body = bodies[0]
        elif args.body_file:
            body = json.loads(Path(args.body_file).read_text("utf-8"))
        else:
            body = json.loads(args.body) if args.body else {}
    except (OSError, ValueError) as err:
        return usage(f"cannot read the body: {err}")
    if not isinstance(body, dict):
        return usage("the body must be a JSON object")
    host, port = cfg.mqtt.host, cfg.mqtt.port
    if args.broker:
        h, sep, p = args.broker.rpartition(":")
        if not sep or not h or not p.isdigit():
            return usage(f"--broker {args.broker!r}: expected HOST:PORT")
        host, port = h, int(p)
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if password is None:
            return usage(f"--password-env: environment variable {args.password_env} unset")
    broker = Broker(
        host,
        port,
        cfg.mqtt.topic_prefix,
        cfg.mqtt.protocol,
        args.username,
        password,
        tls_context(cfg.mqtt) if cfg.mqtt.tls else None,
    )
    try:
        for request_body in bodies or [body]:
            reply = send_command(
                broker,
                args.appliance or cfg.appliance.id,
                args.cmd_command,
                request_body,
                timeout_s=args.timeout,
            )
            if reply.get("code") != "ok":
                break
    except CommandTimeout as err:
        print(f"appliance cmd: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"appliance cmd: cannot reach the broker {host}:{port}: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(reply, indent=2))
    return EXIT_OK if reply.get("code") in OK_CODES else EXIT_FAILED
