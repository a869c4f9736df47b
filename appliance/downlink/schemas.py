"""The request and reply schemas of the commands (``appliance/schemas/cmd/``, docs/mqtt.md).

``<command>.request.json`` describes a whole request, ``{"request_id": ..., "body": {...}}``
(draft 2020-12); ``reply.json`` the one reply format every command shares. A schema that
describes the body alone (no ``body`` property at its top level) is applied to the body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import jsonschema

from appliance.schemas import SCHEMA_DIR

log = logging.getLogger(__name__)

CMD_SCHEMA_DIR = SCHEMA_DIR / "cmd"
_MAX_ERROR_CHARS = 200  # a refusal never echoes a large (or secret) value back


@cache
def load_cmd_schema(name: str) -> dict[str, Any]:
    """``<name>.json`` of ``appliance/schemas/cmd/`` (``status.request``, ``reply``...)."""
    schema: dict[str, Any] = json.loads((CMD_SCHEMA_DIR / f"{name}.json").read_text("utf-8"))
    return schema


def _where(err: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in err.absolute_path) or "(request)"


def request_validator(command: str) -> Callable[[dict[str, Any]], str | None]:
    """A function ``request -> None`` (valid) or the first error, naming the key path. A
    command without a request schema refuses every request (logged once here)."""
    try:
        schema = load_cmd_schema(f"{command}.request")
    except (OSError, ValueError) as err:
        log.error("downlink: %s has no usable request schema (%s): refusing it", command, err)
        why = f"no request schema for {command} on this appliance"
        return lambda request: why
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema)
    whole = "body" in schema.get("properties", {})

    def validate(request: dict[str, Any]) -> str | None:
        instance = request if whole else request.get("body", {})
        err = jsonschema.exceptions.best_match(validator.iter_errors(instance))
        if err is None:
            return None
        text = err.message
        if len(text) > _MAX_ERROR_CHARS:
            text = f"{text[:_MAX_ERROR_CHARS]}… (cut)"
        return f"{_where(err)}: {text}"

    return validate
