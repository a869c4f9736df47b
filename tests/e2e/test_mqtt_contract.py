"""docs/mqtt.md's examples and the shipped JSON Schemas agree (messages the appliance really
sends are validated in tests/e2e/test_end_to_end.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from appliance.schemas import KINDS, load_schema

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_schemas_are_valid_draft_2020_12(kind: str) -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema(kind))


def doc_examples() -> list[dict[str, Any]]:
    text = (REPO / "docs" / "mqtt.md").read_text()
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def test_docs_show_an_example_of_every_kind() -> None:
    assert {e["kind"] for e in doc_examples()} == {"telemetry", "alert", "quality", "status"}


@pytest.mark.parametrize("example", doc_examples(), ids=lambda e: str(e["kind"]))
def test_every_docs_example_validates_against_its_schema(example: dict[str, Any]) -> None:
    jsonschema.validate(example, load_schema(str(example["kind"])))


def test_schema_rejects_a_telemetry_message_without_seq() -> None:
    example = next(e for e in doc_examples() if e["kind"] == "telemetry")
    del example["seq"]
    with pytest.raises(jsonschema.ValidationError, match="'seq' is a required property"):
        jsonschema.validate(example, load_schema("telemetry"))


@pytest.mark.parametrize("kind", ["telemetry", "alert"])
def test_schemas_require_the_epoch_and_docs_ids_carry_it(kind: str) -> None:
    example = next(e for e in doc_examples() if e["kind"] == kind)
    assert (
        example["id"]
        == f"{example['appliance']}/{example['stream']}/{example['epoch']}/{example['seq']}"
    )
    del example["epoch"]
    with pytest.raises(jsonschema.ValidationError, match="'epoch' is a required property"):
        jsonschema.validate(example, load_schema(kind))


def test_docs_show_a_historical_example_and_the_schemas_accept_only_a_boolean_flag() -> None:
    late = [e for e in doc_examples() if "historical" in e]
    assert late and all(e["historical"] is True for e in late)
    for kind in ("telemetry", "alert"):
        example = next(e for e in doc_examples() if e["kind"] == kind)
        jsonschema.validate({**example, "historical": True}, load_schema(kind))
        with pytest.raises(jsonschema.ValidationError, match="is not of type 'boolean'"):
            jsonschema.validate({**example, "historical": "yes"}, load_schema(kind))
