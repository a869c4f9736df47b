"""Framing, pure: a byte stream → complete text lines. No I/O, table-tested.

:class:`LineFramer` splits on any byte of ``delimiters`` (CR and LF by default; the Haas driver
adds STX 0x02 and ETB 0x17, which wrap each reply). Empty pieces between delimiters are dropped,
so CRLF, LF, STX…ETB CR LF all give one line. Bytes after the last delimiter stay buffered until
the next :meth:`LineFramer.feed` completes them (a line split across reads is reassembled). A line
longer than ``max_line_bytes`` is discarded up to the next delimiter and counted in
``overflows``, so a device that never sends a delimiter cannot grow the buffer without bound.
"""

from __future__ import annotations

import re

CR = 0x0D
LF = 0x0A
STX = 0x02
ETB = 0x17


class LineFramer:
    """Incremental splitter of a byte stream into lines (``bytes`` without delimiters)."""

    def __init__(self, delimiters: bytes = b"\r\n", *, max_line_bytes: int = 4096) -> None:
        if not delimiters:
            raise ValueError("delimiters must not be empty")
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
        self._split = re.compile(b"[" + re.escape(delimiters) + b"]").split
        self.max_line_bytes = max_line_bytes
        self._buf = b""
        self._discarding = False
        #: Lines discarded because they exceeded ``max_line_bytes``.
        self.overflows = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the lines it completed, in order (never empty lines)."""
        pieces = self._split(self._buf + data)
        tail = pieces.pop()
        out: list[bytes] = []
        for piece in pieces:
            if self._discarding:  # the rest of an overlong line: drop it, resync here
                self._discarding = False
                continue
            if len(piece) > self.max_line_bytes:
                self.overflows += 1
            elif piece:
                out.append(piece)
        if len(tail) > self.max_line_bytes:
            if not self._discarding:
                self.overflows += 1
            self._discarding = True
            tail = b""
        self._buf = tail
        return out

    def clear(self) -> bytes:
        """Drop and return the incomplete line buffered so far (e.g. after a reconnect)."""
        tail, self._buf = self._buf, b""
        self._discarding = False
        return tail

    @property
    def pending(self) -> int:
        """Bytes buffered towards an incomplete line."""
        return len(self._buf)
