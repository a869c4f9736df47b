"""Pure parts of the downlink: the TOML writer, the dedup store, the registry, the handlers'
refusals without a config file."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Config
from appliance.downlink import commands
from appliance.downlink.base import Request
from appliance.downlink.registry import COMMANDS, merge
from appliance.downlink.store import DedupStore
from appliance.downlink.tomlfile import dumps, write_atomically

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_toml_writer_round_trips_a_configuration_document() -> None:
    doc: dict[str, Any] = {
        "appliance": {"id": "cell-01", "drain_timeout_s": 2.5},
        "devices": [
            {
                "name": "cnc-1",
                "registers": [{"name": "t", "address": 0, "scale": 0.1}],
                "groups": {"fast": 100, "odd key": 5},
            },
            {"name": "cnc-2", "host": 'quote"and\\back\nslash ü'},
        ],
        "telemetry": {"stats": ["mean", "max"], "deadband": {}},
        "mqtt": {"tls": False, "port": 1883},
        "top": 1e-300,
    }
    assert tomllib.loads(dumps(doc)) == doc


@pytest.mark.parametrize(
    "doc,where",
    [({"a": {"b": None}}, "a.b"), ({"x": [1.0, float("nan")]}, "x[1]"), ({"s": {1, 2}}, "s")],
)
def test_toml_writer_refuses_what_toml_cannot_hold_naming_the_key(
    doc: dict[str, Any], where: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(where)):
        dumps(doc)


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("old")
    write_atomically(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.toml"]


def test_dedup_store_keeps_the_newest_ids_and_survives_a_reopen(tmp_path: Path) -> None:
    store = DedupStore(tmp_path / "d.sqlite", keep=3)
    store.open()
    for i in range(5):
        store.put(f"r{i}", "status", {"code": "ok", "n": i})
    assert len(store) == 3 and store.get("r0") is None and store.get("r1") is None
    assert store.get("r4") == {"code": "ok", "n": 4}
    store.close()
    again = DedupStore(tmp_path / "d.sqlite", keep=3)
    again.open()
    assert again.get("r2") == {"code": "ok", "n": 2}
    again.close()


def test_a_corrupt_dedup_store_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "d.sqlite").write_bytes(b"not a database" * 100)
    store = DedupStore(tmp_path / "d.sqlite", keep=3)
    store.open()
    store.put("r", "status", {})
    assert store.recovered_corrupt == 1 and store.get("r") == {}
    assert any(p.name.startswith("d.sqlite.corrupt-") for p in tmp_path.iterdir())
    store.close()


def test_registry_refuses_a_command_defined_twice() -> None:
    assert {"status", "config.apply", "rules.apply", "alerts.ack"} <= set(COMMANDS)
    with pytest.raises(ValueError, match="'status' is defined twice"):
        merge(commands.COMMANDS, {"status": commands.status})


class _NoFile:
    """A CommandContext without a config file (an appliance built in code)."""

    appliance: Any = None
    config = Config()
    config_path = None
    state_dir = Path("/nonexistent")


@pytest.mark.parametrize("command", ["config.apply", "rules.apply"])
def test_applying_is_refused_when_the_appliance_has_no_config_file(command: str) -> None:
    body = {"config": "x"} if command == "config.apply" else {"rules": []}
    reply = asyncio.run(COMMANDS[command](_NoFile(), Request(command, "r", body, 0.0)))
    assert reply.code == "refused" and "without a config file" in reply.message
