"""``appliance simulate``: option parsing, a timed run, and a clean stop on SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, wait_port

from appliance.simulate.cell import FaultSchedule
from appliance.simulate.cli import add_arguments, parse_fault, run

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="appliance simulate")
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("temp_ramp@2:10:20", FaultSchedule(1, "temp_ramp", 10.0, 20.0)),
        ("vibration_surge@1:0.5", FaultSchedule(0, "vibration_surge", 0.5, 20.0)),
        ("temp_ramp@4:0:3.5", FaultSchedule(3, "temp_ramp", 0.0, 3.5)),
    ],
)
def test_fault_option_parses_kind_one_based_machine_time_and_duration(
    spec: str, expected: FaultSchedule
) -> None:
    assert parse_fault(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("temp_ramp", "is not KIND@MACHINE"),
        ("temp_ramp@2", "is not KIND@MACHINE"),
        ("temp_ramp@2:1:2:3", "is not KIND@MACHINE"),
        ("meltdown@1:10", "unknown fault kind"),
        ("temp_ramp@0:10", "numbered from 1"),
        ("temp_ramp@x:10", "must be an integer"),
        ("temp_ramp@1:-5", "at_s"),
        ("temp_ramp@1:5:0", "duration_s"),
    ],
)
def test_fault_option_rejects_malformed_specs(spec: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_fault(spec)


def test_defaults_match_the_documented_ones() -> None:
    args = parse()
    assert (args.machines, args.host, args.base_port, args.seed) == (4, "127.0.0.1", 5020, 42)
    assert args.tick_hz == 20.0 and args.time_scale == 1.0
    assert args.fault == [] and args.duration is None


def test_help_points_at_the_register_map_documentation() -> None:
    parser = argparse.ArgumentParser(prog="appliance simulate")
    add_arguments(parser)
    text = parser.format_help()
    assert "docs/simulator.md" in text
    assert "--fault KIND@MACHINE:AT_S[:DURATION_S]" in text


def test_run_with_duration_serves_then_exits_zero(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    args = parse(
        "--machines",
        "1",
        "--base-port",
        str(port),
        "--duration",
        "0.3",
        "--fault",
        "temp_ramp@1:0:1",
    )
    caplog.set_level("INFO", logger="appliance.simulate")
    assert run(args) == 0
    assert f"cnc-1: Modbus TCP on 127.0.0.1:{port}" in caplog.text
    assert "cnc-1: fault temp_ramp injected" in caplog.text


def test_run_rejects_a_fault_for_a_machine_that_does_not_exist(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(parse("--machines", "2", "--fault", "temp_ramp@3:1")) == 2
    assert "machine index 2" in capsys.readouterr().err


def test_run_exits_one_when_the_port_is_taken() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        assert run(parse("--machines", "1", "--base-port", str(port), "--duration", "5")) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_simulator_cleanly_with_exit_zero(sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.simulate.cli",
            "--machines",
            "1",
            "--base-port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        wait_port(port)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "simulated cell stopped" in text


def test_transport_fault_kinds_are_accepted_on_the_command_line() -> None:
    assert parse_fault("timeout@1:2:3") == FaultSchedule(0, "timeout", 2.0, 3.0)
    assert parse_fault("disconnect@2:0") == FaultSchedule(1, "disconnect", 0.0, 20.0)


def test_new_options_default_to_the_plain_cnc_sim_cell() -> None:
    args = parse()
    assert (args.byte_order, args.fifo_address, args.replay, args.map) == (None, 200, None, [])
    args = parse("--byte-order", "CDAB", "--fifo-address", "-1")
    assert (args.byte_order, args.fifo_address) == ("CDAB", -1)


def test_run_serves_a_replay_with_a_byte_order_and_exits_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = tmp_path / "rec.csv"
    csv.write_text("t,rpm\n0,1000\n1,2000\n")
    port = free_port()
    args = parse(
        *("--machines", "1", "--base-port", str(port), "--duration", "0.2"),
        *("--replay", str(csv), "--map", "rpm=spindle_speed", "--byte-order", "DCBA"),
        *("--fault", "timeout@1:0:1"),
    )
    caplog.set_level("INFO", logger="appliance.simulate")
    assert run(args) == 0
    assert "cnc-1: transport fault timeout" in caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--map", "rpm=spindle_speed"), "--map needs --replay"),
        (("--replay", "/nonexistent/rec.csv", "--map", "a=spindle_speed"), "rec.csv"),
        (("--replay", "REC", "--map", "rpm"), "is not COLUMN=REGISTER"),
    ],
)
def test_run_rejects_unusable_replay_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    csv = tmp_path / "rec.csv"
    csv.write_text("t,rpm\n0,1000\n1,2000\n")
    argv = tuple(str(csv) if a == "REC" else a for a in argv)
    assert run(parse("--machines", "1", *argv)) == 2
    assert message in capsys.readouterr().err


def test_unknown_profile_is_refused_listing_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(parse("--profile", "bench-fifty")) == 2
    err = capsys.readouterr().err
    assert "--profile 'bench-fifty': unknown profile" in err
    assert "cnc-sim" in err and "bench-N" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--profile", "bench-0"), "1..125 registers"),
        (("--profile", "bench-126"), "1..125 registers"),
        (("--profile", "bench-50", "--fault", "temp_ramp@1:1"), "--fault needs --profile cnc-sim"),
        (("--profile", "bench-50", "--byte-order", "CDAB"), "--byte-order needs"),
    ],
)
def test_bench_profile_refuses_what_it_cannot_serve(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(parse(*argv)) == 2
    assert message in capsys.readouterr().err


def test_help_explains_the_profiles() -> None:
    parser = argparse.ArgumentParser(prog="appliance simulate")
    add_arguments(parser)
    text = parser.format_help()
    assert "--profile NAME" in text
    assert "bench-N" in text and "bench-50" in text


def test_bench_profile_serves_its_register_map_to_a_modbus_client() -> None:
    """``--profile bench-50`` in its own process: each machine on BASE_PORT + N - 1 answers a
    50-register FC 3 read (every register 7) and refuses register 50 (illegal address)."""
    from pymodbus.client import ModbusTcpClient

    base = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.simulate.cli", "--profile", "bench-50"]
        + ["--machines", "2", "--base-port", str(base)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        for port in (base, base + 1):
            wait_port(port)
            client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
            try:
                assert client.connect()
                ok = client.read_holding_registers(0, count=50, device_id=1)
                assert not ok.isError() and ok.registers == [7] * 50
                beyond = client.read_holding_registers(50, count=1, device_id=1)
                assert beyond.isError() and beyond.exception_code == 2
            finally:
                client.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out.decode()
    assert "2 bench machines, 50 holding registers each" in out.decode()
