"""Run a real Mosquitto broker as a child process on a chosen port (demo and tests).

Mosquitto 2 ignores ``-p`` once a ``listener`` is configured and then defaults
``allow_anonymous`` to false, so every instance gets its own config file.
"""

from __future__ import annotations

import getpass
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary (also looked up in /usr/sbin, where Debian installs it)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux), or 32768."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(n: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """The first of ``n`` consecutive TCP ports that were all free on ``host`` a moment ago
    (for ``appliance simulate --base-port``, which listens on ``base .. base + n - 1``).

    The block is taken below the kernel's ephemeral range, so that the local end of some other
    outgoing connection cannot take one of its ports between this check and the listener's
    bind (``bind(0)``, as :func:`free_port` uses, picks from that very range)."""
    rng = random.Random()
    top = min(_ephemeral_low(), 65536) - n
    for _ in range(tries):
        base = rng.randrange(10000, top) if top > 10000 else free_port(host)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise OSError(f"no block of {n} free consecutive ports on {host}")


def wait_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on ``host:port``; TimeoutError if not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


class MosquittoProcess:
    """A mosquitto child process; ``stop()`` then ``start()`` simulates a broker outage.

    With ``persistence`` on, persistent client sessions and their queued QoS 1 messages survive
    a restart, as on a production broker.
    """

    def __init__(
        self,
        port: int,
        workdir: Path,
        *,
        persistence: bool = True,
        extra_conf: str = "",
        allow_anonymous: bool = True,
    ) -> None:
        self.port = port
        self.workdir = workdir
        self.persistence = persistence
        self.extra_conf = extra_conf
        self.allow_anonymous = allow_anonymous
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            # Started as root, mosquitto drops to the `mosquitto` user, which then cannot write
            # its persistence file here: sessions would silently not survive a restart.
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"log_dest file {self.workdir}/mosquitto.log",
            "max_queued_messages 100000",
            "max_inflight_messages 1000",
        ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "autosave_interval 1",
            ]
        self.conf.write_text("\n".join(lines) + "\n" + self.extra_conf)

    def reconfigure(self, extra_conf: str, *, allow_anonymous: bool | None = None) -> None:
        """Restart with ``extra_conf`` appended to the generated config (ACLs, auth, more
        listeners such as a TLS one: ``listener PORT`` then ``cafile``/``certfile``/``keyfile``).

        ``allow_anonymous`` (when given) replaces the constructor's choice; ``false`` plus a
        ``password_file`` line in ``extra_conf`` makes every client authenticate.
        """
        self.stop()
        self.extra_conf = extra_conf
        if allow_anonymous is not None:
            self.allow_anonymous = allow_anonymous
        self.write_conf()
        self.start()

    def start(self, timeout_s: float = 10.0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install -y mosquitto)")
        if not self.conf.exists():
            self.write_conf()
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(self.port, timeout_s)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the broker (it saves its persistence file first); idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
