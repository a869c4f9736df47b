"""TLS and credentials of the MQTT uplink (see "Security" in :mod:`appliance.uplink.mqtt`).

The password comes from ``mqtt.password_file`` (re-read before every connection attempt) or the
environment variable ``mqtt.password_env`` and travels as a :class:`Secret`, never in the config
struct or a log line. Errors name the config key, never the value. Called on the event loop
(``start()``) and in the connection worker thread (``read_password`` before each attempt).
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import stat

from appliance.config import MqttSection
from appliance.errors import ConfigError

log = logging.getLogger("appliance.uplink.mqtt")  # the uplink logs under one name

AUTH_REASONS = frozenset({0x86, 0x87, 0x8C})
"""CONNACK reasons that mean the credentials are wrong or not allowed."""


class Secret:
    """A string that stays out of ``repr``/``str`` (logs, tracebacks, debug dumps)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


def read_password(cfg: MqttSection) -> Secret | None:
    """The MQTT password from ``password_file`` (trailing newline stripped) or ``password_env``.

    ``None`` when neither is configured. Raises :class:`ConfigError` naming the key (never the
    value) when the file cannot be read or the variable is unset.
    """
    if cfg.password_file:
        try:
            with open(cfg.password_file, encoding="utf-8") as f:
                return Secret(f.read().rstrip("\r\n"))
        except (OSError, UnicodeDecodeError) as err:
            detail = err.strerror if isinstance(err, OSError) else "not UTF-8"
            raise ConfigError(
                f"mqtt.password_file: cannot read {cfg.password_file}: {detail or err}"
            ) from None
    if cfg.password_env:
        value = os.environ.get(cfg.password_env)
        if value is None:
            raise ConfigError(f"mqtt.password_env: environment variable {cfg.password_env} unset")
        return Secret(value)
    return None


def check_password_file_mode(cfg: MqttSection) -> None:
    """Warn when ``mqtt.password_file`` can be read by other users."""
    path = cfg.password_file
    if not path:
        return
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "mqtt.password_file %s can be read by other users (mode %o): chmod 600 it",
                path,
                stat.S_IMODE(mode),
            )


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho 2.2 drops the socket without closing it when ``do_handshake`` raises (a verification
    failure): without this, every failed attempt would leak a file descriptor until GC.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(cfg: MqttSection) -> ssl.SSLContext:
    """The client TLS context: verification on (chain + host name) unless ``tls_insecure``.

    Raises :class:`ConfigError` naming the key when a CA, certificate or key file is unusable.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file or None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"mqtt.ca_file: cannot load {cfg.ca_file}: {err}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"mqtt.cert_file/key_file: cannot load {cfg.cert_file} / {cfg.key_file}: {err}"
            ) from None
    if cfg.tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.sslsocket_class = _ClosingSSLSocket
    return ctx


def describe_connect_error(err: BaseException | None, host: str) -> tuple[str, str]:
    """(category, text) of a failed connection attempt: ``tls`` or ``connect``."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return "tls", (
            f"TLS certificate verification failed: {err.verify_message or err.reason}; check "
            f"mqtt.ca_file and that the broker's certificate is issued for {host!r}"
        )
    if isinstance(err, ssl.SSLError):
        return "tls", f"TLS handshake failed: {err.reason or err}"
    if isinstance(err, ConnectionRefusedError):
        return "connect", "connection refused"
    if err is None:
        return "connect", "connection failed"
    return "connect", f"connection failed: {err}"
