"""docs/mqtt.md's command examples validate against the shipped request and reply schemas, and
every command of the registry has a schema and a documented example."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from appliance.downlink.channel import REFUSAL_REASONS
from appliance.downlink.registry import COMMANDS
from appliance.downlink.schemas import CMD_SCHEMA_DIR, load_cmd_schema

REPO = Path(__file__).resolve().parents[2]
MQTT_MD = (REPO / "docs" / "mqtt.md").read_text()


def examples() -> list[tuple[str, str, dict[str, Any]]]:
    """(request|reply, command, example) of every ```json request:<cmd> / reply:<cmd> block."""
    found = re.findall(r"```json (request|reply):([A-Za-z0-9._-]+)\n(.*?)```", MQTT_MD, re.S)
    return [(kind, cmd, json.loads(text)) for kind, cmd, text in found]


@pytest.mark.parametrize("path", sorted(CMD_SCHEMA_DIR.glob("*.json")), ids=lambda p: p.name)
def test_command_schemas_are_valid_draft_2020_12(path: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


@pytest.mark.parametrize("kind,command,example", examples(), ids=lambda x: str(x)[:30])
def test_every_command_example_in_the_docs_validates_against_its_schema(
    kind: str, command: str, example: dict[str, Any]
) -> None:
    schema = load_cmd_schema(f"{command}.request" if kind == "request" else "reply")
    jsonschema.validate(example, schema)
    if kind == "reply":
        assert example["command"] == command


def test_every_command_has_a_request_schema_a_documented_request_and_reply() -> None:
    documented = {(kind, cmd) for kind, cmd, _ in examples()}
    for command in COMMANDS:
        assert (CMD_SCHEMA_DIR / f"{command}.request.json").is_file(), command
        assert ("request", command) in documented, command
        assert ("reply", command) in documented, command
        assert f"### `{command}`" in MQTT_MD, command


def test_every_refusal_reason_is_documented() -> None:
    for reason in REFUSAL_REASONS:
        assert f"| `{reason}` |" in MQTT_MD, reason


def test_the_reply_schema_refuses_an_unknown_code() -> None:
    reply = next(e for k, _, e in examples() if k == "reply")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**reply, "code": "maybe"}, load_cmd_schema("reply"))
