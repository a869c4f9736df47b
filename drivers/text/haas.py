"""Haas machine data collection (MDC) "Q commands" over a serial port or TCP (port 5051).

Layers: :func:`parse_reply`, :func:`decode_q500` and :func:`decode_q600` are the pure codec;
:class:`HaasDevice` is the driver (one command at a time, reply matching, quality per value).

Replies are framed tolerantly (every accepted shape is listed in ``docs/drivers-text.md``): an
optional STX (0x02) before and ETB (0x17) after the text, CR/LF line ends and a ``>`` prompt
before or after are all stripped by :class:`~drivers.text.framing.LineFramer` and
:func:`parse_reply`. The text is comma-separated fields: ``SERIAL NUMBER, 1234567`` (two fields),
``MACRO, 1200.0000`` or ``MACRO, 3027, 1200.0000`` (three), ``PROGRAM, O00123, IDLE, PARTS, 45``
or ``STATUS, BUSY`` (Q500).

Reply matching: a control answers every connection's query on every connection and a reply can
arrive after its timeout, so each command accepts only replies with its own key (and, for a
three-field Q600 reply, its own variable number). Replies of other known keys are stale, skipped
and counted. ``?``/``INVALID``/``UNKNOWN``/``ERROR`` replies refuse the current item and unknown
text is garbage for the current item: both make only that item BAD (a
:class:`~drivers.errors.DeviceException` in the result) and are counted; no reply at all within
``timeout_s`` is a transport failure (:class:`~drivers.errors.DeviceUnavailable`).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from drivers.errors import DeviceException, DeviceUnavailable
from drivers.quality import BAD, GOOD, STALE, ReadResult
from drivers.text.framing import LineFramer
from drivers.text.transport import Transport

log = logging.getLogger(__name__)

#: Bytes that end (or start) a reply: CR, LF, STX, ETB.
HAAS_DELIMITERS = b"\r\n\x02\x17"
#: Reply keys the driver knows; any other first field is garbage.
KNOWN_KEYS = frozenset(
    {
        "SERIAL NUMBER",
        "SOFTWARE VERSION",
        "SOFTWARE, VERSION",
        "MODEL",
        "MODE",
        "PROGRAM",
        "STATUS",
        "MACRO",
        "TOOL CHANGES",
        "USING TOOL",
        "P.O. TIME",
        "C.S. TIME",
        "LAST CYCLE",
        "PREV CYCLE",
        "M30 #1",
        "M30 #2",
    }
)
_REFUSAL_WORDS = ("?", "INVALID", "UNKNOWN", "ERROR")
#: Q500 statuses that mean a program is running (``running`` = 1); see :data:`IDLE_STATUSES`.
RUNNING_STATUSES = frozenset({"BUSY", "RUNNING", "RUN", "CYCLE"})
#: Q500 statuses that mean no program is running (``running`` = 0). Any other status is BAD.
IDLE_STATUSES = frozenset(
    {"IDLE", "ALARM", "ALARM ON", "FEED HOLD", "FEEDHOLD", "STOP", "STOPPED", "RESET"}
)


class ReplyError(ValueError):
    """A reply of the right kind whose fields cannot be decoded."""


@dataclass(frozen=True, slots=True)
class HaasReply:
    """One reply line as fields (whitespace-stripped). ``key`` is the upper-cased first field."""

    text: str
    fields: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.fields[0].upper() if self.fields else ""

    @property
    def empty(self) -> bool:
        """A line with nothing but a prompt or blanks."""
        return not self.text

    @property
    def refused(self) -> bool:
        """``?``, ``INVALID ...``, ``UNKNOWN ...`` or ``ERROR ...``: the control refused it."""
        return any(self.key.startswith(w) for w in _REFUSAL_WORDS)

    @property
    def known(self) -> bool:
        return self.key in KNOWN_KEYS


def parse_reply(line: str) -> HaasReply:
    """Split one framed reply line into fields, dropping ``>`` prompts and blanks. Pure."""
    text = line.strip().strip(">").strip()
    if not text:
        return HaasReply("", ())
    return HaasReply(text, tuple(f.strip() for f in text.split(",")))


def _number(field: str, what: str) -> float:
    try:
        value = float(field)
    except ValueError:
        raise ReplyError(f"{what} {field!r} is not a number") from None
    if not math.isfinite(value):
        raise ReplyError(f"{what} {field!r} is not finite")
    return value


@dataclass(frozen=True, slots=True)
class Q500Status:
    """Decoded Q500: ``program`` (``O00123``, ``MDI``; None when busy), ``status`` (upper case),
    ``parts`` (the M30 parts counter; None when the reply has none, e.g. ``STATUS, BUSY``)."""

    program: str | None
    status: str
    parts: float | None

    @property
    def running(self) -> float | None:
        """1.0 running, 0.0 not running, None for a status this driver does not know."""
        if self.status in RUNNING_STATUSES:
            return 1.0
        if self.status in IDLE_STATUSES:
            return 0.0
        return None


def decode_q500(reply: HaasReply) -> Q500Status:
    """``PROGRAM, <name>, <status>, PARTS, <n>`` or ``STATUS, <status>``. Raises ReplyError."""
    f = reply.fields
    if reply.key == "STATUS" and len(f) == 2 and f[1]:
        return Q500Status(None, f[1].upper(), None)
    if reply.key == "PROGRAM" and len(f) == 5 and f[3].upper() == "PARTS" and f[2]:
        return Q500Status(f[1], f[2].upper(), _number(f[4], "parts count"))
    if reply.key == "PROGRAM" and len(f) == 3 and f[2]:
        return Q500Status(f[1], f[2].upper(), None)
    raise ReplyError(f"unexpected Q500 reply shape {reply.text!r}")


def q600_matches(reply: HaasReply, var: int) -> bool:
    """False only for a three-field ``MACRO, <other var>, v`` reply (one for another query)."""
    if len(reply.fields) != 3:
        return True
    try:
        return int(float(reply.fields[1])) == var
    except ValueError:
        return True  # not a variable number: let decode_q600 call it garbage


def decode_q600(reply: HaasReply, var: int) -> float:
    """``MACRO, <value>`` or ``MACRO, <var>, <value>`` → the value. Raises ReplyError."""
    f = reply.fields
    if reply.key != "MACRO" or len(f) not in (2, 3):
        raise ReplyError(f"unexpected Q600 reply shape {reply.text!r}")
    if len(f) == 3 and _number(f[1], "variable number") != var:
        raise ReplyError(f"reply is for variable {f[1]}, not {var}")
    return _number(f[-1], f"variable {var}")


@dataclass(frozen=True)
class HaasVariable:
    """Q600 variable ``var`` read as channel ``name`` (engineering value = raw * scale + offset)."""

    name: str
    var: int
    scale: float = 1.0
    offset: float = 0.0


class HaasDevice:
    """One Haas control read with Q commands, values aligned with :attr:`channels`.

    Channels: each of ``variables`` (Q600) in order, then ``parts_channel`` (Q500 parts counter)
    and ``running_channel`` (Q500 status: 1 running, 0 not) unless empty. A read sends ``Q104``
    (when ``query_mode``), ``Q500`` (when a Q500 channel is configured) and one ``Q600 <var>``
    per variable, in that order, each waiting up to ``timeout_s`` for its reply. ``Q100`` is
    sent on :meth:`connect` (twice if needed: the first query after connecting may go
    unanswered). String replies go to :attr:`identity` (``serial_number``, ``mode``,
    ``program``, ``status``), never into values.

    While Q500 reports ``STATUS, BUSY`` (no parts counter), ``parts_channel`` repeats the last
    counter with STALE (BAD/NaN before any) — map Q600 3901 if parts are needed while running.

    Construction does no I/O; ``close()`` is idempotent. Use from one task at a time.
    """

    def __init__(
        self,
        transport: Transport,
        variables: Sequence[HaasVariable],
        *,
        parts_channel: str = "parts_count",
        running_channel: str = "running",
        timeout_s: float = 1.0,
        command_prefix: str = "?",
        query_mode: bool = True,
        name: str = "haas",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"haas {name}: timeout_s must be > 0, got {timeout_s}")
        self.name = name
        self._transport = transport
        self._variables = tuple(variables)
        self._parts_i = len(self._variables) if parts_channel else -1
        self._running_i = len(self._variables) + (1 if parts_channel else 0)
        if not running_channel:
            self._running_i = -1
        names = [v.name for v in self._variables]
        names += [n for n in (parts_channel, running_channel) if n]
        if not names:
            raise ValueError(f"haas {name}: no channels (no variables, parts or running)")
        if len(set(names)) != len(names):
            raise ValueError(f"haas {name}: duplicate channel names in {names}")
        #: Channel names, in the order of every :class:`ReadResult`.
        self.channels: tuple[str, ...] = tuple(names)
        self._scale = np.array([v.scale for v in self._variables], dtype=np.float64)
        self._offset = np.array([v.offset for v in self._variables], dtype=np.float64)
        self._timeout_s = timeout_s
        self._prefix = command_prefix
        self._query_mode = query_mode
        self._monotonic = monotonic
        self._framer = LineFramer(HAAS_DELIMITERS)
        self._lines: collections.deque[bytes] = collections.deque()
        self._last_parts = math.nan
        #: Strings the control reported: serial_number, mode, program, status.
        self.identity: dict[str, str] = {}
        self.replies = 0
        self.refused = 0
        self.garbage = 0
        self.stale_replies = 0

    def stats(self) -> dict[str, int]:
        """Counters since construction: replies matched, refused items, garbage replies, stale
        replies skipped (answers to other queries), framer overflows."""
        return {
            "replies": self.replies,
            "refused": self.refused,
            "garbage": self.garbage,
            "stale_replies": self.stale_replies,
            "overflows": self._framer.overflows,
        }

    async def connect(self) -> None:
        """Open the transport and ask for the serial number (Q100, up to two tries)."""
        self._framer.clear()
        self._lines.clear()
        await self._transport.open()
        for attempt in (1, 2):
            try:
                reply = await self._transact("Q100", ("SERIAL NUMBER",), last_try=attempt == 2)
            except TimeoutError:  # unanswered first query: ask again on the same link
                continue
            if reply.key == "SERIAL NUMBER" and len(reply.fields) >= 2:
                self.identity["serial_number"] = reply.fields[1]
            else:
                log.debug("haas %s: Q100 answered %r", self.name, reply.text)
            return

    async def read(self, group: str | None = None) -> ReadResult:
        """One poll: Q104, Q500, Q600 per variable. Raises DeviceUnavailable on no reply.

        ``group`` is accepted for the poller's interface and ignored: one group, every channel.
        """
        n = len(self.channels)
        values = np.full(n, math.nan, dtype=np.float64)
        quality = np.full(n, BAD, dtype=np.uint8)
        exceptions: list[DeviceException] = []
        if self._lines:  # unsolicited lines left from before: never answers to this poll
            self.stale_replies += len(self._lines)
            self._lines.clear()
        if self._query_mode:
            reply = await self._transact("Q104", ("MODE",))
            if reply.key == "MODE" and len(reply.fields) >= 2:
                self.identity["mode"] = ", ".join(reply.fields[1:])
            else:
                self._count_failure(reply)
        if self._parts_i >= 0 or self._running_i >= 0:
            await self._read_q500(values, quality, exceptions)
        for i, v in enumerate(self._variables):
            reply = await self._transact(
                f"Q600 {v.var}", ("MACRO",), functools.partial(q600_matches, var=v.var)
            )
            try:
                if reply.refused:
                    raise ReplyError("refused")
                raw = decode_q600(reply, v.var)
            except ReplyError as err:
                self._count_failure(reply)
                exceptions.append(self._exception(600, v.var, f"Q600 {v.var}", err, reply))
                continue
            values[i] = raw * self._scale[i] + self._offset[i]
            quality[i] = GOOD
        return ReadResult(values, quality, tuple(exceptions))

    async def _read_q500(
        self,
        values: npt.NDArray[np.float64],
        quality: npt.NDArray[np.uint8],
        exceptions: list[DeviceException],
    ) -> None:
        reply = await self._transact("Q500", ("PROGRAM", "STATUS"))
        try:
            if reply.refused:
                raise ReplyError("refused")
            st = decode_q500(reply)
        except ReplyError as err:
            self._count_failure(reply)
            exceptions.append(self._exception(500, 500, "Q500", err, reply))
            return
        self.identity["status"] = st.status
        if st.program is not None:
            self.identity["program"] = st.program
        if self._parts_i >= 0:
            if st.parts is not None:
                self._last_parts = st.parts
                values[self._parts_i] = st.parts
                quality[self._parts_i] = GOOD
            elif not math.isnan(self._last_parts):
                values[self._parts_i] = self._last_parts
                quality[self._parts_i] = STALE
        if self._running_i >= 0:
            running = st.running
            if running is not None:
                values[self._running_i] = running
                quality[self._running_i] = GOOD
            else:
                exceptions.append(
                    self._exception(
                        500, 500, "Q500", ReplyError(f"unknown status {st.status!r}"), reply
                    )
                )

    def _count_failure(self, reply: HaasReply) -> None:
        if reply.refused:
            self.refused += 1
        else:
            self.garbage += 1

    def _exception(
        self, q: int, address: int, what: str, err: Exception, reply: HaasReply
    ) -> DeviceException:
        return DeviceException(
            f"haas {self.name}: {what}: {err} (reply {reply.text!r})",
            table=f"Q{q}",
            address=address,
            count=1,
            function_code=q,
            exception_code=0,
        )

    async def _transact(
        self,
        command: str,
        keys: tuple[str, ...],
        matches: Callable[[HaasReply], bool] | None = None,
        *,
        last_try: bool = True,
    ) -> HaasReply:
        """Send ``command``; return its reply (or a refusal, or garbage). See module docstring.

        No reply within the timeout closes the link and raises DeviceUnavailable, or, when not
        ``last_try``, raises the builtin TimeoutError with the link left open (to ask again).
        """
        await self._transport.write(f"{self._prefix}{command}\r\n".encode("ascii"))
        deadline = self._monotonic() + self._timeout_s
        while True:
            while self._lines:
                reply = parse_reply(self._lines.popleft().decode("ascii", errors="replace"))
                if reply.empty:
                    continue
                if reply.key in keys and (matches is None or matches(reply)):
                    self.replies += 1
                    return reply
                if reply.known and not reply.refused:
                    self.stale_replies += 1
                    log.debug("haas %s: skipped stale reply %r", self.name, reply.text)
                    continue
                return reply  # refused or garbage: the current item is BAD
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                if not last_try:
                    raise TimeoutError(command)
                await self._transport.close()
                raise DeviceUnavailable(
                    f"haas {self.name} ({self._transport.name}): no reply to {command} "
                    f"within {self._timeout_s:g} s"
                )
            data = await self._transport.read_some(remaining)
            if data:
                self._lines.extend(self._framer.feed(data))

    async def close(self) -> None:
        """Close the transport. Idempotent."""
        await self._transport.close()
