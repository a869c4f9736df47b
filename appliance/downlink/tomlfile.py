"""Writing the configuration file: a TOML emitter for a decoded document and the atomic write.

The emitter covers what a configuration holds (tables, arrays of tables, strings, numbers,
booleans, arrays, inline tables); it refuses ``null`` and non-finite numbers, which TOML cannot
hold, naming the key path. Comments of a file rewritten from its decoded content are lost.
:func:`write_atomically` writes a temporary file in the same directory, fsyncs it, renames it
over the target and fsyncs the directory, so the file is always either the old or the new one.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: must be a finite number (not inf or nan)")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, dict):
        items = (f"{_key(str(k))} = {_value(v, f'{path}.{k}')}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if value is None:
        raise ValueError(f"{path}: null has no TOML form (leave the key out)")
    raise ValueError(f"{path}: {type(value).__name__} has no TOML form")


def _table_body(table: dict[str, Any], path: str) -> list[str]:
    return [f"{_key(str(k))} = {_value(v, f'{path}.{k}')}" for k, v in table.items()]


def dumps(doc: dict[str, Any]) -> str:
    """``doc`` (a decoded TOML/JSON document) as TOML text. Raises ``ValueError``."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in doc.items():
        if isinstance(value, dict) or (
            isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        ):
            tables.append((str(key), value))
        else:
            lines.append(f"{_key(str(key))} = {_value(value, str(key))}")
    for key, value in tables:
        if isinstance(value, dict):
            lines += ["", f"[{_key(key)}]", *_table_body(value, key)]
        else:
            for i, item in enumerate(value):
                lines += ["", f"[[{_key(key)}]]", *_table_body(item, f"{key}[{i}]")]
    return "\n".join(lines).lstrip("\n") + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
