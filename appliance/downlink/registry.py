"""Every downlink command: the ``COMMANDS`` of each handler module, merged.

A handler module exposes ``COMMANDS: dict[str, Handler]`` and ships the request schema of each
command in ``appliance/schemas/cmd/<command>.request.json``; adding a module here is one import
and one entry in :data:`_MODULES`. A command name defined twice is a programming error.
"""

from __future__ import annotations

from collections.abc import Mapping

from appliance.downlink import backfill, commands, device_write, model_release
from appliance.downlink.base import Handler

_MODULES: tuple[Mapping[str, Handler], ...] = (
    commands.COMMANDS,
    model_release.COMMANDS,
    device_write.COMMANDS,
    backfill.COMMANDS,
)


def merge(*tables: Mapping[str, Handler]) -> dict[str, Handler]:
    """One table from several; raises ``ValueError`` naming a command defined twice."""
    out: dict[str, Handler] = {}
    for table in tables:
        for name, handler in table.items():
            if name in out:
                raise ValueError(f"downlink command {name!r} is defined twice")
            out[name] = handler
    return out


COMMANDS: dict[str, Handler] = merge(*_MODULES)
