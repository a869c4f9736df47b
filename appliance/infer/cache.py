"""The engine cache: serialized TensorRT engines that are never wrong.

Layout of ``<cache_dir>``::

    <model>-<key16>.engine   the serialized engine (TensorRT plan)
    <model>-<key16>.json     metadata: every key field, the full key, created, build_s, size
    <model>-<key16>.lock     fcntl lock file: one builder per key across processes
    timing/<key16>.cache     TensorRT timing cache (per TensorRT version + GPU)
    ort-trt/<model>-<key16>/ onnxruntime TensorRT EP engine cache folder (same key discipline)

The key is the sha256 of every input that changes the built engine: the ONNX file's sha256, the
TensorRT version, the GPU name and compute capability, the precision, the optimisation profile
shapes and the builder flags (workspace limit). A new ONNX, a TensorRT upgrade or a moved SD
card lands on another file name, so a stale engine is never even looked at.

Guarantees:

* Writes are atomic: temp file in the same folder, fsync, rename, then fsync of the folder.
  The engine is written before its metadata, so metadata never points at a partial engine.
* Two processes never build the same key at once: the builder holds ``fcntl.flock`` on the lock
  file; the second waits, then finds and loads what the first wrote.
* An engine whose metadata key does not match, that is missing its metadata, whose size does not
  match, or that fails to deserialize is rebuilt, never loaded; counted in ``CacheStats`` and
  logged once per file.
* A cache dir that cannot be created or written is a :class:`ModelError` naming the dir, so the
  serving chain moves on to the next backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from appliance.errors import ModelError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: (tensor name, min shape, opt shape, max shape)
ProfileShape = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class CacheKey:
    """Every input that changes a built engine. ``digest`` is its sha256 (hex)."""

    model: str
    onnx_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str
    precision: str  # "fp32" | "fp16"
    profile: tuple[ProfileShape, ...]
    builder_flags: tuple[str, ...]  # e.g. ("workspace_mb=1024",)

    def fields(self) -> dict[str, Any]:
        """The key as JSON-ready builtins (what the metadata file stores)."""
        return {
            "model": self.model,
            "onnx_sha256": self.onnx_sha256,
            "trt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "profile": [[n, list(lo), list(opt), list(hi)] for n, lo, opt, hi in self.profile],
            "builder_flags": list(self.builder_flags),
        }

    @property
    def digest(self) -> str:
        blob = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def stem(self) -> str:
        """File name stem: ``<model>-<first 16 hex digits of the key>``."""
        return f"{self.model}-{self.digest[:16]}"


@dataclass
class CacheStats:
    hits: int = 0
    builds: int = 0
    waited_for_other_builder: int = 0
    invalid_rebuilt: int = 0
    last_build_s: float = 0.0
    invalid_reasons: list[str] = field(default_factory=list)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ensure_writable_dir(path: Path, what: str = "engine cache dir") -> Path:
    """Create ``path`` if needed and prove it writable; ModelError naming it otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ModelError(
            f"{what} {path} is not writable: {err.strerror or err} "
            "(set engine.cache_dir to a writable folder)"
        ) from None
    return path


class EngineCache:
    """Serialized engines under ``cache_dir``, keyed by :class:`CacheKey`. One per process is
    fine; several may share a dir (the lock is per key file, across processes)."""

    _logged: set[str] = set()  # invalid engine files already warned about (once per process)

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        self.stats = CacheStats()

    def engine_path(self, key: CacheKey) -> Path:
        return self.dir / f"{key.stem}.engine"

    def meta_path(self, key: CacheKey) -> Path:
        return self.dir / f"{key.stem}.json"

    def timing_cache_path(self, key: CacheKey) -> Path:
        """Timing caches depend on the TensorRT version and the GPU only."""
        blob = f"{key.trt_version}|{key.gpu_name}|{key.compute_capability}"
        return self.dir / "timing" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.cache"

    # -- reading --------------------------------------------------------------------------
    def _invalid(self, key: CacheKey, why: str) -> None:
        self.stats.invalid_rebuilt += 1
        self.stats.invalid_reasons.append(why)
        path = str(self.engine_path(key))
        if path not in EngineCache._logged:
            EngineCache._logged.add(path)
            log.warning("engine cache: %s: %s; rebuilding it", path, why)

    def _read_valid(self, key: CacheKey) -> bytes | None:
        """The engine bytes when engine + metadata exist and the metadata matches ``key``.

        Returns None when there is no entry; an entry that exists but does not match is counted
        as invalid (and also returns None).
        """
        ep, mp = self.engine_path(key), self.meta_path(key)
        if not ep.exists() and not mp.exists():
            return None
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
            data = ep.read_bytes()
        except (OSError, ValueError) as err:
            self._invalid(key, f"unreadable engine or metadata ({err})")
            return None
        if not isinstance(meta, dict) or meta.get("key") != key.digest:
            self._invalid(key, "metadata key does not match")
            return None
        if meta.get("fields") != key.fields():
            self._invalid(key, "metadata key fields do not match")
            return None
        if meta.get("size") != len(data):
            self._invalid(key, f"engine is {len(data)} bytes, metadata says {meta.get('size')}")
            return None
        return data

    def is_cached(self, key: CacheKey) -> bool:
        """Cheap check (no deserialization) that a matching entry exists."""
        ep, mp = self.engine_path(key), self.meta_path(key)
        if not (ep.is_file() and mp.is_file()):
            return False
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (
            isinstance(meta, dict)
            and meta.get("key") == key.digest
            and meta.get("fields") == key.fields()
            and meta.get("size") == ep.stat().st_size
        )

    # -- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: CacheKey) -> Iterator[bool]:
        """Hold the per-key build lock; yields True when another process held it first."""
        ensure_writable_dir(self.dir)
        lock_path = self.dir / f"{key.stem}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ModelError(
                f"engine cache dir {self.dir}: cannot open lock file {lock_path}: "
                f"{err.strerror or err}"
            ) from None
        try:
            waited = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited = True
                log.info("engine cache: another process is building %s; waiting", key.stem)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield waited
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def store(self, key: CacheKey, data: bytes, build_s: float) -> None:
        """Write engine then metadata, each atomically."""
        atomic_write(self.engine_path(key), data)
        meta = {
            "key": key.digest,
            "fields": key.fields(),
            "created": time.time(),
            "build_s": build_s,
            "size": len(data),
            "engine": self.engine_path(key).name,
        }
        atomic_write(self.meta_path(key), json.dumps(meta, indent=1).encode())

    def get_or_build(
        self,
        key: CacheKey,
        build: Callable[[], bytes],
        deserialize: Callable[[bytes], T | None],
        *,
        on_build: Callable[[], None] | None = None,
    ) -> tuple[T, str]:
        """The deserialized engine for ``key`` and how it was had: "cached" or "built".

        ``deserialize`` returns None (or raises) for bytes it cannot load: such an entry is
        rebuilt. ``build`` runs under the per-key lock; ``on_build`` is called just before it
        (progress display).
        """
        obj = self._load(key, deserialize)
        if obj is not None:
            self.stats.hits += 1
            return obj, "cached"
        with self.lock(key) as waited:
            if waited:
                self.stats.waited_for_other_builder += 1
                obj = self._load(key, deserialize)
                if obj is not None:
                    self.stats.hits += 1
                    return obj, "cached"
            if on_build is not None:
                on_build()
            t0 = time.perf_counter()
            data = build()
            build_s = time.perf_counter() - t0
            obj = _try_deserialize(deserialize, data)
            if obj is None:
                raise ModelError(
                    f"engine for {key.model} ({key.stem}) was built but does not deserialize"
                )
            self.store(key, data, build_s)
            self.stats.builds += 1
            self.stats.last_build_s = build_s
            log.info("engine cache: built %s in %.1f s", self.engine_path(key), build_s)
            return obj, "built"

    def _load(self, key: CacheKey, deserialize: Callable[[bytes], T | None]) -> T | None:
        data = self._read_valid(key)
        if data is None:
            return None
        obj = _try_deserialize(deserialize, data)
        if obj is None:
            self._invalid(key, "engine does not deserialize")
        return obj


def _try_deserialize(deserialize: Callable[[bytes], T | None], data: bytes) -> T | None:
    try:
        return deserialize(data)
    except Exception as err:  # TensorRT raises untyped errors for corrupt plans
        log.debug("deserialize failed: %s", err)
        return None


def list_cache(cache_dir: str | Path) -> list[dict[str, Any]]:
    """Every entry in ``cache_dir`` (``appliance engine list``): metadata + on-disk state.

    Each row: ``file``, ``model``, ``key16``, ``precision``, ``trt_version``, ``gpu_name``,
    ``compute_capability``, ``profile``, ``size``, ``created``, ``build_s``, ``state``
    (``ok`` | ``engine missing`` | ``size mismatch`` | ``bad metadata``) and for the
    onnxruntime TensorRT EP folders ``kind = "ort-trt"``.
    """
    d = Path(cache_dir)
    rows: list[dict[str, Any]] = []
    if not d.is_dir():
        return rows
    for mp in sorted(d.glob("*.json")) + sorted((d / "ort-trt").glob("*.json")):
        row: dict[str, Any] = {"file": str(mp.with_suffix(""))}
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
            f = meta["fields"]
            row.update(
                kind=meta.get("kind", "tensorrt"),
                model=f["model"],
                key=meta["key"],
                key16=meta["key"][:16],
                precision=f["precision"],
                trt_version=f["trt_version"],
                gpu_name=f["gpu_name"],
                compute_capability=f["compute_capability"],
                profile=f["profile"],
                size=meta.get("size"),
                created=meta.get("created"),
                build_s=meta.get("build_s"),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            row.update(state=f"bad metadata ({err})")
            rows.append(row)
            continue
        target = mp.with_suffix("") if row["kind"] == "ort-trt" else mp.with_suffix(".engine")
        if row["kind"] == "ort-trt":
            size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            row.update(size=size, state="ok" if target.is_dir() else "engine missing")
        elif not target.is_file():
            row.update(state="engine missing")
        elif target.stat().st_size != row["size"]:
            row.update(state="size mismatch")
        else:
            row.update(state="ok")
        rows.append(row)
    return rows
