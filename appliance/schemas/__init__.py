"""JSON Schemas (draft 2020-12) of every MQTT message kind; documented in docs/mqtt.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent
KINDS = ("telemetry", "alert", "quality", "status")


def load_schema(kind: str, version: int = 1) -> dict[str, Any]:
    """The schema of message ``kind`` (``telemetry``, ``alert``, ``quality``, ``status``)."""
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{kind}.v{version}.json").read_text())
    return schema
