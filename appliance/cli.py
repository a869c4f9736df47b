"""Command line: ``appliance run | check-config | simulate | demo``.

Exit codes: 0 success; 1 runtime failure (model, I/O); 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from appliance import __version__
from appliance.errors import ApplianceError, ConfigError

log = logging.getLogger("appliance")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # pymodbus logs every failed connect at ERROR; our pollers log transitions once instead.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from appliance.config import load_config

    cfg = load_config(args.file)
    n_regs = sum(len(d.registers) for d in cfg.devices)
    print(
        f"{args.file}: OK — appliance {cfg.appliance.id}, {len(cfg.devices)} devices, "
        f"{n_regs} registers, {len(cfg.alerts.rules)} alert rules, model {cfg.engine.model}, "
        f"mqtt {cfg.mqtt.host}:{cfg.mqtt.port}"
    )
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from appliance.config import load_config
    from appliance.runtime import Appliance

    cfg = load_config(args.config)
    setup_logging(args.log_level or cfg.appliance.log_level)
    app = Appliance(cfg)
    asyncio.run(app.run_until_signal(args.duration))
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    from appliance.simulate import cli as sim_cli

    setup_logging(args.log_level or "info")
    return sim_cli.run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run as demo_run

    setup_logging(args.log_level or "warning")
    return demo_run.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="appliance",
        description="Edge-AI appliance for CNC cells: polls machines over Modbus, scores feature "
        "windows on an ONNX model (TensorRT/onnxruntime), raises alerts and publishes alerts and "
        "telemetry over MQTT with an on-disk outbox that survives outages.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=description)
        sp.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            help="logging verbosity (default: from the config, or info)",
        )
        return sp

    sp = add(
        "run",
        "run the appliance from a config file",
        "Run the appliance: poll the configured devices, score windows, publish to MQTT. "
        "Stops cleanly on SIGINT/SIGTERM (drains the outbox within a deadline).",
    )
    sp.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML config file")
    sp.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds (default: run until signalled)",
    )
    sp.set_defaults(func=_cmd_run)

    sp = add(
        "check-config",
        "validate a config file and exit",
        "Validate a config file. Exit 0 when valid; exit 2 with the file, key path and "
        "offending value when not.",
    )
    sp.add_argument("file", metavar="FILE", help="TOML config file")
    sp.set_defaults(func=_cmd_check_config)

    from appliance.simulate import cli as sim_cli

    sp = add(
        "simulate",
        "run a simulated CNC cell (Modbus TCP servers)",
        "Run N simulated CNC machines, each a Modbus TCP server with the register map of "
        "drivers/profiles/cnc-sim.toml (documented in docs/simulator.md).",
    )
    sim_cli.add_arguments(sp)
    sp.set_defaults(func=_cmd_simulate)

    from appliance.demo import run as demo_run

    sp = add(
        "demo",
        "simulated cell → appliance → MQTT → live output",
        "Start a simulated CNC cell, an MQTT broker (mosquitto if installed, else an embedded "
        "one), the appliance and a subscriber that prints telemetry and alerts. A spindle "
        "over-temperature fault is injected after about 10 s. Ctrl-C stops everything.",
    )
    demo_run.add_arguments(sp)
    sp.set_defaults(func=_cmd_demo)

    from appliance.api import status_cli

    sp = add(
        "status",
        "show a running appliance's status (local API)",
        "Ask a running appliance's local API (/api/v1/status) and print its health, devices, "
        "model, outbox/uplink and active alerts. Exit 0 when ready, 1 when not ready or not "
        "answering.",
    )
    status_cli.add_arguments(sp)
    sp.set_defaults(func=status_cli.run)

    from appliance.infer import cli as engine_cli

    sp = add(
        "engine", "build or list inference engines", "Build engines ahead of time, list the cache."
    )
    engine_cli.add_arguments(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as err:
        print(f"appliance: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ApplianceError as err:
        print(f"appliance: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
