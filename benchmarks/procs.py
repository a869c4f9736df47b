"""Processes of an end-to-end benchmark run and what the harness reads from them.

The appliance is a black box here: it runs as ``python -m appliance run -c FILE`` (or
``simulate``), and the harness reads only what any operator could read: /proc/<pid>/stat,
status and io (CPU, RSS, bytes written), the health line it logs to stderr (``outbox pending``)
and the counters it writes at stop (``--stats-json``). Messages are counted by
:class:`Subscriber`, a paho client like a plant's historian.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (Linux /proc), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in KiB; empty when it is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def proc_io(pid: int) -> dict[str, int]:
    """``write_bytes``/``read_bytes`` of ``pid`` (/proc/<pid>/io; empty when not readable)."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    pairs = (line.split(":") for line in text.splitlines())
    return {k: int(v) for k, v in pairs if k in ("read_bytes", "write_bytes")}


class Sampler:
    """Samples a process's CPU and RSS every ``interval_s`` in a thread: ``samples`` holds
    ``(t_s since start, cpu %, rss MiB)``; ``peak_rss_mib`` is the kernel's high-water mark."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []
        self.peak_rss_mib = 0.0
        self.cpu_s = 0.0
        self.io: dict[str, int] = {}
        self._pid: int | None = None
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, pid: int) -> None:
        """Follow ``pid`` (a restarted process: CPU adds up, the RSS series continues)."""
        self._pid = pid
        if self._thread is None:
            self._t0 = time.monotonic()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        last: tuple[float, float] | None = None
        pid = None
        base = 0.0
        while not self._stop.wait(self.interval_s):
            if self._pid != pid:
                base, pid, last = self.cpu_s, self._pid, None
            if pid is None:
                continue
            cpu = proc_cpu_s(pid)
            status = proc_status_kib(pid)
            if cpu is None or not status:
                continue
            io = proc_io(pid)
            if io:
                self.io = io
            now = time.monotonic()
            self.cpu_s = base + cpu
            rss = status.get("VmRSS", 0) / 1024
            self.peak_rss_mib = max(self.peak_rss_mib, status.get("VmHWM", 0) / 1024)
            if last is not None:
                pct = 100 * (cpu - last[1]) / (now - last[0])
                self.samples.append((now - self._t0, pct, rss))
            last = (now, cpu)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class LogReader:
    """Reads a child's stderr in a thread: keeps the tail, and every ``outbox pending N`` of the
    appliance's health line with the time it arrived (``backlog``: (t monotonic, N)), and the
    line's polls and overruns (``polls``, ``overruns``: (t monotonic, count since the last
    line))."""

    HEALTH = re.compile(r"health: (\d+) polls.*outbox pending (\d+)")
    OVERRUNS = re.compile(r"(\d+) overruns")

    def __init__(self, stream: IO[bytes]) -> None:
        self.tail: list[str] = []
        self.backlog: list[tuple[float, int]] = []
        self.polls: list[tuple[float, int]] = []
        self.overruns: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self.tail = [*self.tail[-40:], line]
            m = self.HEALTH.search(line)
            if m:
                now = time.monotonic()
                self.polls.append((now, int(m.group(1))))
                self.backlog.append((now, int(m.group(2))))
                o = self.OVERRUNS.search(line)
                self.overruns.append((now, int(o.group(1)) if o else 0))


def spawn(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start ``python args...`` from the repository root (the checkout on sys.path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL if "stdin" not in kw else kw.pop("stdin"),
        stdout=kw.pop("stdout", subprocess.DEVNULL),
        stderr=kw.pop("stderr", subprocess.PIPE),
        **kw,
    )


def stop_proc(proc: subprocess.Popen[bytes] | None, timeout_s: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL; idempotent."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Received:
    """One message as the subscriber got it."""

    t: float  # time.time() at on_message
    nbytes: int  # topic + payload
    kind: str
    key: tuple[str, Any, int] | None  # (stream, epoch or None, seq)
    msg: dict[str, Any] = field(repr=False)


class Subscriber:
    """A paho subscriber with a persistent session (QoS 1) on ``topics``; records every message
    with its arrival time and size. Loss and duplicates are counted on (stream, epoch, seq):
    ``epoch`` is the payload's ``epoch`` field when present (an outbox that restarted its
    sequence numbers), else None."""

    def __init__(self, port: int, topics: list[str], client_id: str) -> None:
        self.port = port
        self.topics = topics
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 2)

    def start(self, timeout_s: float = 10.0) -> None:
        self._client.connect_async("127.0.0.1", self.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            raise TimeoutError(f"subscriber could not connect to 127.0.0.1:{self.port}")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self.topics])
            self._connected.set()

    def _on_message(self, client: Any, userdata: Any, m: mqtt.MQTTMessage) -> None:
        t = time.time()
        try:
            msg = json.loads(m.payload)
        except ValueError:
            msg = {}
        kind = str(msg.get("kind") or m.topic.rsplit("/", 1)[-1])
        seq = msg.get("seq")
        key = None
        if isinstance(seq, int):
            stream = msg.get("stream") or f"{kind}/{msg.get('machine')}"
            key = (str(stream), msg.get("epoch"), seq)
        rec = Received(t, len(m.topic) + len(m.payload), kind, key, msg)
        with self.lock:
            self.messages.append(rec)

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.messages)


def loss_and_duplicates(messages: list[Received]) -> dict[str, int]:
    """Per (stream, epoch): sequence numbers missing up to the last seen (from 1 without an
    epoch, else from the first seen): lost; copies beyond the first: duplicates. A coarsened
    telemetry message covers ``coarsened.first_seq``..``seq``."""
    seen: dict[tuple[str, Any], set[int]] = {}
    dup = 0
    for r in messages:
        if r.key is None:
            continue
        stream, epoch, seq = r.key
        got = seen.setdefault((stream, epoch), set())
        first = seq
        coarse = r.msg.get("coarsened")
        if isinstance(coarse, dict) and isinstance(coarse.get("first_seq"), int):
            first = coarse["first_seq"]
        if seq in got:
            dup += 1
        got.update(range(first, seq + 1))
    # Without an epoch the appliance's streams start at seq 1: a missing head counts as lost.
    lost = sum(
        max(s) - (1 if epoch is None else min(s)) + 1 - len(s)
        for (_, epoch), s in seen.items()
        if s
    )
    return {
        "streams": len(seen),
        "unique": sum(len(s) for s in seen.values()),
        "lost": lost,
        "duplicates": dup,
    }
