"""Command line: ``appliance run | check-config | selftest | engine build|list | profile from-csv |
simulate | demo | update | bench | cmd``.

Exit codes: 0 success; 1 runtime failure (I/O); 2 invalid configuration (a model that cannot
be loaded included) or usage.
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
    from appliance.runtime.checks import config_warnings, served_models

    cfg = load_config(args.file)
    try:
        served = served_models(cfg)
    except ConfigError as err:
        raise ConfigError(f"{args.file}: {err}") from None
    for warning in config_warnings(cfg, served):
        print(f"appliance: warning: {args.file}: {warning}", file=sys.stderr)
    n_regs = sum(len(d.registers) for d in cfg.devices)
    if not served:
        model = "no model (nothing is scored)"
    elif cfg.models:
        model = "models " + ", ".join(m.name for m in served)
    else:
        model = f"model {cfg.engine.model}"
    print(
        f"{args.file}: OK — appliance {cfg.appliance.id}, {len(cfg.devices)} devices, "
        f"{n_regs} registers, {len(cfg.alerts.rules)} alert rules, {model}, "
        f"mqtt {cfg.mqtt.host}:{cfg.mqtt.port}"
    )
    return EXIT_OK


PROFILE_CSV_HELP = """\
Write a register-map profile (TOML) from a spreadsheet exported as CSV, then use it in the
config with `profile = "<path>"` (relative to the config file's folder).

The first row is the header. Columns, in any order and letter case (other columns are ignored;
a blank optional cell takes the default, or the device's `order`/`type` in the config):
  name      required  channel name: a letter or _, then letters, digits, _
  address   required  request address, 0-based as on the wire (decimal or 0x hex)
  table     optional  holding (default), input, coil, discrete
  type      optional  uint16 (default), int16, uint32, int32, uint64, int64, float32,
                      float64, bool (coils and discrete inputs), bit
  order     optional  byte/word order ABCD (default), CDAB, BADC, DCBA, any letter case
  scale     optional  engineering value = raw * scale + offset (default 1)
  offset    optional  (default 0)
  unit      optional  engineering unit, e.g. degC

The profile is checked like the config checks it (types, duplicate names, overlapping
registers) by loading the written file back. Errors name the CSV row (the header is row 1)
and the column. Exit 0 when written, 2 on an error in the CSV."""


def _cmd_profile_from_csv(args: argparse.Namespace) -> int:
    from pathlib import Path

    from drivers.modbus.profile_csv import csv_to_profile
    from drivers.modbus.registers import RegisterMapError

    out = Path(args.out) if args.out else Path(args.file).with_suffix(".toml")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists (give --force to overwrite it)")
    try:
        registers = csv_to_profile(args.file, out)
    except RegisterMapError as err:
        raise ConfigError(str(err)) from None
    print(f"{out}: {len(registers)} registers from {args.file}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from appliance.config import load_config
    from appliance.runtime import Appliance

    cfg = load_config(args.config)
    setup_logging(args.log_level or cfg.appliance.log_level)
    if cfg.downlink.enabled:  # the command channel outlives the pipeline (config.apply)
        from appliance.downlink.runner import DownlinkRunner

        app: Appliance | DownlinkRunner = DownlinkRunner(cfg, args.config, freeze_gc=True)
    else:
        app = Appliance(cfg, freeze_gc=True)
    try:
        asyncio.run(app.run_until_signal(args.duration))
    finally:
        if args.stats_json:
            import json

            with open(args.stats_json, "w", encoding="utf-8") as f:
                json.dump(app.stats(), f, indent=2, default=str)
    return EXIT_OK


def _cmd_selftest(args: argparse.Namespace) -> int:
    import json

    from appliance.config import Config, load_config
    from appliance.infer.selftest import format_report, run_selftest

    setup_logging(args.log_level or "warning")
    if args.iterations < 1:
        raise ConfigError(f"--iterations must be at least 1, got {args.iterations}")
    cfg = load_config(args.config) if args.config else Config()
    models = [b.model for b in cfg.models] or [cfg.engine.model]
    if models == [""]:
        print("no model configured (engine.model is empty): nothing to test")
        return EXIT_OK
    report = run_selftest(models, cfg, iterations=args.iterations)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return EXIT_OK if report["passed"] else EXIT_FAILURE


def _cmd_simulate(args: argparse.Namespace) -> int:
    from appliance.simulate import cli as sim_cli

    setup_logging(args.log_level or "info")
    return sim_cli.run(args)


def _bench_package() -> str | None:
    """The source checkout's ``benchmarks/`` folder (not installed with the package), or None."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return str(root) if (root / "benchmarks" / "__main__.py").is_file() else None


def _cmd_bench(args: argparse.Namespace) -> int:
    root = _bench_package()
    if root is None:
        print(
            "appliance bench: the benchmark harness lives in the source checkout's benchmarks/ "
            "folder, which is not installed with the package; run it from a checkout "
            "(pip install -e '.[bench]', then `appliance bench` or `python -m benchmarks`)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if root not in sys.path:
        sys.path.insert(0, root)
    import importlib

    bench = importlib.import_module("benchmarks.bench")  # not followed by mypy: not a package
    argv: list[str] = list(args.bench_args)
    if argv[:1] == ["--"]:  # main() puts it there so that options reach the harness
        argv = argv[1:]
    rc: int = bench.main(argv)
    return rc


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
    sp.add_argument(
        "--stats-json",
        metavar="PATH",
        help="write the appliance's counters (the stats of every stage) to PATH when it stops",
    )
    sp.set_defaults(func=_cmd_run)

    sp = add(
        "check-config",
        "validate a config file and exit",
        "Validate a config file as `appliance run` would: the schema, register maps (no "
        "overlapping registers), the model (`engine.model` loads, `features.window_s` is the "
        "model's). Exit 0 when valid; exit 2 with the file, key path and offending value when "
        "not. Warnings (e.g. two devices with the same host, port and unit id) go to stderr "
        "and do not change the exit code.",
    )
    sp.add_argument("file", metavar="FILE", help="TOML config file")
    sp.set_defaults(func=_cmd_check_config)

    sp = sub.add_parser(
        "profile",
        help="register-map profiles (import from a spreadsheet)",
        description="Register-map profiles: files with a [[registers]] array that a device "
        'uses with `profile = "<path>"`.',
    )
    profile_sub = sp.add_subparsers(dest="profile_command", metavar="SUBCOMMAND", required=True)
    sp = profile_sub.add_parser(
        "from-csv",
        help="write a profile from a register-map CSV",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=PROFILE_CSV_HELP,
    )
    sp.add_argument("file", metavar="FILE", help="the CSV file (comma or semicolon separated)")
    sp.add_argument(
        "--out", metavar="PATH", help="profile to write (default: FILE with the suffix .toml)"
    )
    sp.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    sp.set_defaults(func=_cmd_profile_from_csv)

    sp = add(
        "selftest",
        "check every inference backend on this host",
        "For every inference backend (TensorRT, onnxruntime CUDA, onnxruntime CPU; absent ones "
        "are listed with the reason) and every configured model (`[[models]]`, or "
        "`engine.model`): build or load, parity error "
        "against the golden vectors, latency p50/p99 at batch 1 and at batch.max_batch, rows/s. "
        "Exit 0 when at least one backend passes, 1 when none does.",
    )
    sp.add_argument("-c", "--config", metavar="FILE", help="TOML config (default: defaults)")
    sp.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    sp.add_argument(
        "--iterations", type=int, default=200, metavar="N", help="timed calls per batch size"
    )
    sp.set_defaults(func=_cmd_selftest)

    from appliance.simulate import cli as sim_cli

    sp = add(
        "simulate",
        "run a simulated CNC cell (Modbus TCP servers)",
        "Run N simulated CNC machines, each a Modbus TCP server with the register map of "
        "drivers/profiles/cnc-sim.toml (documented in docs/simulator.md), or with --profile "
        "bench-N benchmark-sized machines of N constant holding registers.",
    )
    sim_cli.add_arguments(sp)
    sp.set_defaults(func=_cmd_simulate)

    from appliance.demo import run as demo_run

    sp = add(
        "demo",
        "simulated cell → appliance → MQTT → live output",
        "Start a simulated CNC cell, an MQTT broker (mosquitto if installed, else the embedded "
        "amqtt broker of the `demo` extra: pip install -e '.[demo]'), the appliance and a "
        "subscriber that prints telemetry and alerts. A spindle over-temperature fault is "
        "injected after about 10 s. Ctrl-C stops everything.",
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

    sp = sub.add_parser(
        "bench",
        help="end-to-end benchmark against a naive baseline (source checkout only)",
        description="Run the benchmark harness of the source checkout (benchmarks/, also "
        "`python -m benchmarks`): real simulator, appliance, Mosquitto and subscriber processes "
        "against a naive polling loop. All arguments go to the harness: "
        "`appliance bench --help` lists them.",
        add_help=False,
    )
    sp.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS")
    sp.set_defaults(func=_cmd_bench)

    from appliance.downlink import client as cmd_cli

    sp = sub.add_parser(
        "cmd",
        help="send a command to an appliance over MQTT, print its reply",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=cmd_cli.CMD_HELP,
    )
    cmd_cli.add_arguments(sp)
    sp.set_defaults(func=cmd_cli.run)

    from appliance.modelkit import cli as model_cli

    sp = add(
        "record",
        "record the polled values as CSV, one file per machine",
        "Poll the configured devices for --duration seconds and write every GOOD value to "
        "<out>/<machine>.csv (a time column, one column per channel): the input of "
        "`appliance model fit` and `model eval`.",
    )
    model_cli.add_record_arguments(sp)

    sp = add(
        "model",
        "fit, evaluate, sign a model; make signing keys",
        "Make a model bundle from recordings of normal operation (fit), measure a bundle on "
        "normal and faulty recordings (eval), make a key pair for signed model releases "
        "(keygen) and sign a bundle for `appliance cmd ... model.release --bundle` (sign). "
        "See docs/models.md.",
    )
    model_cli.add_model_arguments(sp)

    from appliance.infer import cli as engine_cli

    sp = add(
        "engine", "build or list inference engines", "Build engines ahead of time, list the cache."
    )
    engine_cli.add_arguments(sp)

    from appliance import update

    sp = add(
        "update",
        "install a signed release bundle, roll back by itself on failure",
        "Verify the bundle (sha256 and Ed25519 signature against /etc/appliance/update-keys) "
        "before touching anything, install the release beside the running one, switch the "
        "current symlink, restart the service, wait for it and the selftest, and switch back "
        "by itself when either fails. /var/lib/appliance (outbox, engines) is never touched. "
        "Exit 0 updated; 1 refused or rolled back.",
    )
    update.add_arguments(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every option belongs to the harness, --help included
        argv = ["bench", "--", *argv[1:]]
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
