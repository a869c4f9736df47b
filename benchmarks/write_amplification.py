"""Write amplification of the outbox + uplink at steady state (issue 10: flash wear).

Bytes the appliance process makes the kernel write to storage (``/proc/<pid>/io``
``write_bytes``: page-cache pages it dirtied, the WAL, the database, checkpoints) against the
payload bytes it published, while ``--machines`` simulated machines each close one telemetry
window per simulated second (demo-sized: 10 channels x ``n mean min max``, ~0.8 KB) and a live
broker acknowledges everything. ``synchronous = FULL`` (the default) throughout.

Each measurement runs in a child process (the same script with ``--child``), so that its
``/proc/self/io`` counts the outbox and the uplink alone: the real ``SqliteOutbox`` in
``--workdir`` (a disk-backed directory: on tmpfs nothing is "written") and the real
``MqttUplink`` publishing to a mosquitto child of this script (no persistence). Windows close
``--speed`` times faster than real time (the bytes written per window do not depend on the
pace as long as the uplink keeps up; ``--speed 1`` checks that). ``--appends``:

- ``close`` (what ``Appliance`` does): every window that closes at the same moment is stored in
  one ``append`` call, i.e. one transaction and one fsync;
- ``machine``: one ``append`` per machine window (the supervisor before issue 10).

Usage::

    .venv/bin/python benchmarks/write_amplification.py                     # 16 and 100 machines
    .venv/bin/python benchmarks/write_amplification.py --machines 16 --seconds 20 --json wa.json

Output: a table, and with ``--json PATH`` a summary; ``per_day_mb`` extrapolates the bytes
written per simulated second to a day of real time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.config import MqttSection  # noqa: E402
from appliance.contracts import Envelope, Priority  # noqa: E402
from appliance.demo.mosquitto import MosquittoProcess, free_port, mosquitto_binary  # noqa: E402
from appliance.outbox import SqliteOutbox  # noqa: E402
from appliance.uplink import MqttUplink  # noqa: E402

APP = "wa-01"
PREFIX = "edge"
CHANNELS = (
    "spindle_speed",
    "spindle_load",
    "axis_load_x",
    "axis_load_y",
    "axis_load_z",
    "spindle_temp",
    "coolant_temp",
    "vibration_rms",
    "part_counter",
    "program_state",
)
T0 = 1_795_000_000.0


def window(machine: int, i: int) -> Envelope:
    """Window ``i`` of machine ``cnc-<machine>``, shaped and sized like the demo's telemetry."""
    end = T0 + i + 1.0
    channels = {
        name: {
            "n": 10,
            "mean": 1000.0 + 37.123457 * k + (i % 97) * 0.013 + machine * 0.001,
            "min": 990.0 + 37.123457 * k,
            "max": 1010.0 + 37.123457 * k + (i % 13) * 0.1,
        }
        for k, name in enumerate(CHANNELS)
    }
    m = f"cnc-{machine}"
    return Envelope(
        stream=f"telemetry/{m}",
        kind="telemetry",
        topic=f"{PREFIX}/{APP}/telemetry/{m}",
        priority=Priority.TELEMETRY,
        ts=end,
        body={"machine": m, "window": {"start": end - 1.0, "end": end}, "channels": channels},
    )


def write_bytes() -> int:
    """Bytes this process caused to be written to storage so far (Linux ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no write_bytes (not Linux, or no task I/O accounting)")


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: produce, publish, drain; return the figures."""
    path = Path(args.workdir) / f"outbox-{args.machines}-{args.appends}.sqlite"
    for sfx in ("", "-wal", "-shm"):
        Path(f"{path}{sfx}").unlink(missing_ok=True)
    ob = SqliteOutbox(str(path), appliance_id=APP, disk_budget_mb=args.budget_mb)
    ob.open()
    cfg = MqttSection(
        host="127.0.0.1",
        port=args.port,
        topic_prefix=PREFIX,
        client_id=f"{APP}-{os.getpid()}",
        max_inflight=max(100, 2 * args.machines),
    )
    uplink = MqttUplink(cfg, APP, ob)
    await uplink.start()
    loop = asyncio.get_running_loop()
    period = 1.0 / args.speed
    total = args.warmup + args.seconds
    payload = 0
    w0 = t0 = 0.0
    published0 = 0
    start = loop.time()
    for i in range(total):
        if i == args.warmup:
            while ob.pending:  # steady state: start from an empty backlog
                await asyncio.sleep(0.001)
            w0, t0, published0 = write_bytes(), time.perf_counter(), ob.stats()["published"]
        envs = [window(m, i) for m in range(args.machines)]
        if args.appends == "close":
            recs = ob.append(envs)
        else:
            recs = [r for env in envs for r in ob.append([env])]
        if i >= args.warmup:
            payload += sum(len(r.payload) for r in recs)
        uplink.notify()
        delay = start + (i + 1) * period - loop.time()
        await asyncio.sleep(max(0.0, delay))
    deadline = loop.time() + 30
    while ob.pending and loop.time() < deadline:
        await asyncio.sleep(0.005)
    written = write_bytes() - w0
    wall = time.perf_counter() - t0
    stats = ob.stats()
    await uplink.stop(drain_timeout_s=1.0)
    ob.close()
    published = int(stats["published"] - published0)
    return {
        "machines": args.machines,
        "appends": args.appends,
        "seconds": args.seconds,
        "speed": args.speed,
        "wall_s": round(wall, 2),
        "messages": published,
        "left_unpublished": int(stats["pending"]),
        "payload_bytes": payload,
        "written_bytes": written,
        "amplification": round(written / payload, 2) if payload else None,
        "payload_per_s": round(payload / args.seconds),
        "written_per_s": round(written / args.seconds),
        "per_day_mb": round(written / args.seconds * 86400 / 1e6, 1),
    }


def measure(args: argparse.Namespace, machines: int, port: int, workdir: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        *("--machines", str(machines), "--port", str(port), "--workdir", str(workdir)),
        *("--seconds", str(args.seconds), "--warmup", str(args.warmup)),
        *("--speed", str(args.speed), "--appends", args.appends),
        *("--budget-mb", str(args.budget_mb)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'machines':>8} {'appends':>8} {'messages':>9} {'payload/s':>10} {'written/s':>10} "
        f"{'ampl.':>6} {'MB/day':>8}"
    )
    lines = [head]
    for r in results:
        lines.append(
            f"{r['machines']:>8} {r['appends']:>8} {r['messages']:>9} "
            f"{r['payload_per_s']:>10} {r['written_per_s']:>10} {r['amplification']:>6} "
            f"{r['per_day_mb']:>8}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machines", type=int, nargs="+", default=[16, 100])
    p.add_argument("--seconds", type=int, default=120, help="simulated seconds measured")
    p.add_argument("--warmup", type=int, default=20, help="simulated seconds before measuring")
    p.add_argument("--speed", type=float, default=10.0, help="simulated seconds per real second")
    p.add_argument("--appends", choices=("close", "machine"), default="close")
    p.add_argument("--budget-mb", type=float, default=256.0, help="outbox.disk_budget_mb")
    p.add_argument(
        "--workdir", type=Path, default=None, help="disk-backed scratch parent (default: $TMPDIR)"
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        args.machines = args.machines[0]
        print(json.dumps(asyncio.run(child(args))))
        return 0
    if mosquitto_binary() is None:
        print("benchmarks/write_amplification.py: mosquitto is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-wa-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        broker = MosquittoProcess(free_port(), workdir / "mosquitto", persistence=False)
        broker.start()
        try:
            results = [measure(args, n, broker.port, workdir) for n in args.machines]
        finally:
            broker.stop()
    print(table(results))
    if args.json is not None:
        summary = {
            "results": results,
            "synchronous": "FULL",
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
