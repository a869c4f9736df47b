"""The command handler interface shared by every downlink command (docs/mqtt.md, "Commands").

A request arrives on ``<prefix>/<appliance>/cmd/<command>``; the channel (``channel.py``) parses
it, checks its size and JSON Schema (``appliance/schemas/cmd/<command>.request.json``),
deduplicates its ``request_id``, and calls the handler registered for ``<command>`` in
``registry.py`` with a :class:`Request` and the :class:`CommandContext`. The handler returns a
:class:`Reply`; the channel stores it under the request id and publishes it on
``<prefix>/<appliance>/reply/<request_id>`` (and on an MQTT 5 response topic when given).

Handlers run on the event loop. They must not block it: slow work (an engine build, a file
write, a Modbus transaction) runs in an executor or as awaited I/O. A handler never raises for
bad input: it returns ``Reply("refused", ...)`` naming what was wrong. An unexpected exception is
turned into ``Reply("error", ...)`` by the channel and counted; it never stops the appliance.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.runtime.supervisor import Appliance

ReplyCode = Literal["ok", "accepted", "refused", "error", "rolled_back"]
"""``ok``: done. ``accepted``: started, a later reply or status shows the outcome (long work such
as an engine build). ``refused``: bad or unauthorised request, nothing changed. ``error``: the
appliance failed while executing; nothing changed or it was undone. ``rolled_back``: applied,
failed its check (readiness, parity), and the previous state was restored."""


@dataclass(frozen=True)
class Request:
    command: str
    request_id: str
    body: Mapping[str, Any]
    received_at: float
    """Wall-clock time (``time.time()``) the request arrived."""


@dataclass(frozen=True)
class Reply:
    code: ReplyCode
    message: str
    body: Mapping[str, Any] = field(default_factory=dict)


class CommandContext(Protocol):
    """What a handler may use. ``appliance`` is the pipeline running now: after a
    ``config.apply`` it is a new object, so handlers read it at call time and never keep it."""

    @property
    def appliance(self) -> Appliance: ...

    @property
    def config(self) -> Config: ...

    @property
    def config_path(self) -> Path | None:
        """The file the running configuration was loaded from (None when built in code)."""
        ...

    @property
    def state_dir(self) -> Path:
        """The only directory handlers may write to (staged models, dedup store, backups)."""
        ...


Handler = Callable[[CommandContext, Request], Awaitable[Reply]]
"""``async def handle(ctx, request) -> Reply``."""
