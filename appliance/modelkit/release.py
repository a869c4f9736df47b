"""The signed model release format (docs/models.md, "Releasing a model"): archive, release
statement, signature, keys, chunks. Pure functions and files; no running appliance.

A release of a bundle folder (``manifest.json`` and the ONNX and golden files it names) is:

- the **archive**: an uncompressed POSIX ustar tar holding exactly those three files at its top
  level, names sorted, mtime 0, uid/gid 0, mode 0644, no user or group names. The same files give
  the same bytes on every machine, so its sha256 (``bundle_sha256``) identifies the bundle.
- the **release statement** (``release.json``): compact JSON with sorted keys,
  ``{"format": "appliance-model-release/1", "name", "version", "bundle_sha256", "bundle_bytes",
  "files": {file name: sha256}}`` (``name``/``version`` are the manifest's).
- its **signature** (``release.sig``): Ed25519 over the exact bytes of the statement, base64.

The appliance checks the signature over the statement bytes it received (never a re-encoding),
then the archive's size and sha256, then every extracted file's sha256 against the statement,
then loads the manifest exactly as serving does.

Keys: ``downlink.model_keys`` entries are ``"ed25519:<base64 of the 32 raw public key bytes>"``
or the path of a PEM public key file (relative to the config file). ``appliance model keygen``
writes a PEM private key (mode 0600) and its public key, and prints the ``ed25519:`` line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from appliance.errors import ApplianceError

FORMAT = "appliance-model-release/1"
STATEMENT_FILE = "release.json"
SIGNATURE_FILE = "release.sig"
#: raw archive bytes per chunk by default: base64 makes 128 KiB into ~171 KiB of JSON, under
#: the channel's default ``downlink.max_payload_bytes`` (256 KiB)
CHUNK_BYTES = 128 * 1024


class ReleaseError(ApplianceError):
    """A release is malformed, unsigned, wrongly signed or does not match its statement."""


@dataclass(frozen=True)
class Statement:
    """A parsed release statement and the exact bytes that were signed."""

    raw: bytes
    name: str
    version: str
    bundle_sha256: str
    bundle_bytes: int
    files: dict[str, str]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain_name(name: object, where: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise ReleaseError(f"{where}: {name!r} is not a plain file name")
    return name


def bundle_files(folder: Path) -> list[str]:
    """The files a release of ``folder`` holds: manifest.json and the files it names."""
    try:
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        names = {"manifest.json", m["onnx"], m["golden"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReleaseError(f"{folder}/manifest.json: cannot read onnx/golden: {err}") from None
    return sorted(_plain_name(n, f"{folder}/manifest.json") for n in names)


def make_archive(folder: Path) -> bytes:
    """The canonical archive of the bundle in ``folder`` (see the module docstring)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in bundle_files(folder):
            data = (folder / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def make_statement(folder: Path, archive: bytes) -> bytes:
    """The release statement of ``folder`` whose canonical archive is ``archive``."""
    try:
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        name, version = str(m["name"]), str(m["version"])
    except (OSError, ValueError, KeyError) as err:
        raise ReleaseError(f"{folder}/manifest.json: {err}") from None
    doc = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "bundle_sha256": sha256_hex(archive),
        "bundle_bytes": len(archive),
        "files": {n: sha256_hex((folder / n).read_bytes()) for n in bundle_files(folder)},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_statement(raw: bytes) -> Statement:
    """Parse statement bytes (after their signature was verified)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        files = doc["files"]
        if not isinstance(files, dict) or "manifest.json" not in files:
            raise ValueError("files must map names to sha256 and include manifest.json")
        for n, h in files.items():
            _plain_name(n, "release statement files")
            if not isinstance(h, str) or len(h) != 64:
                raise ValueError(f"files.{n}: not a sha256")
        size = doc["bundle_bytes"]
        if not isinstance(size, int) or size <= 0:
            raise ValueError("bundle_bytes must be a positive integer")
        return Statement(
            raw=raw,
            name=str(doc["name"]),
            version=str(doc["version"]),
            bundle_sha256=str(doc["bundle_sha256"]),
            bundle_bytes=size,
            files={str(k): str(v) for k, v in files.items()},
        )
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ReleaseError(f"release statement: {err}") from None


# -- keys ------------------------------------------------------------------------------------


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key (logs, replies): 16 hex digits of its sha256."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def public_key_line(key: Ed25519PublicKey) -> str:
    """The ``downlink.model_keys`` entry of ``key``."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def parse_public_key(entry: str, where: str = "downlink.model_keys") -> Ed25519PublicKey:
    """One ``downlink.model_keys`` entry: ``ed25519:BASE64`` or a PEM file path."""
    if entry.startswith("ed25519:"):
        try:
            raw = base64.b64decode(entry[len("ed25519:") :], validate=True)
            return Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError) as err:
            raise ReleaseError(f"{where}: {entry[:20]}…: not a 32-byte base64 key: {err}") from None
    try:
        key = serialization.load_pem_public_key(Path(entry).read_bytes())
    except OSError as err:
        raise ReleaseError(f"{where}: {entry}: cannot read: {err.strerror or err}") from None
    except ValueError as err:
        raise ReleaseError(f"{where}: {entry}: not a PEM public key: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{where}: {entry}: not an Ed25519 public key")
    return key


def load_keys(entries: Sequence[str]) -> list[Ed25519PublicKey]:
    return [parse_public_key(e, f"downlink.model_keys[{i}]") for i, e in enumerate(entries)]


def generate_keys(out_dir: Path, stem: str = "model-signing") -> tuple[Path, Path, str]:
    """Write ``<stem>.key`` (PEM PKCS#8, mode 0600) and ``<stem>.pub`` (PEM) into ``out_dir``;
    refuses to overwrite. Returns both paths and the ``ed25519:`` config line."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{stem}.key", out_dir / f"{stem}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise ReleaseError(f"{p} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key()
    pub_path.write_bytes(
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path, public_key_line(pub)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise ReleaseError(f"{path}: cannot read: {err.strerror or err}") from None
    except (ValueError, TypeError) as err:
        raise ReleaseError(f"{path}: not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: not an Ed25519 private key")
    return key


def sign_bundle(folder: Path, private_key: Path, out_dir: Path | None = None) -> Path:
    """Write ``release.json`` and ``release.sig`` for the bundle in ``folder`` (into
    ``out_dir``, default the bundle folder itself: they are not part of the archive)."""
    key = load_private_key(private_key)
    statement = make_statement(folder, make_archive(folder))
    out = out_dir or folder
    out.mkdir(parents=True, exist_ok=True)
    (out / STATEMENT_FILE).write_bytes(statement)
    (out / SIGNATURE_FILE).write_text(base64.b64encode(key.sign(statement)).decode() + "\n")
    return out / STATEMENT_FILE


def verify_statement(
    raw: bytes, signature_b64: str, keys: Iterable[Ed25519PublicKey]
) -> tuple[Statement, str]:
    """Check ``signature_b64`` over ``raw`` against ``keys``; the parsed statement and the id of
    the key that signed it. Raises ReleaseError when no key verifies it."""
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ReleaseError("signature: not base64") from None
    keys = list(keys)
    if not keys:
        raise ReleaseError("no model signing keys configured (downlink.model_keys)")
    for key in keys:
        try:
            key.verify(signature, raw)
        except InvalidSignature:
            continue
        return parse_statement(raw), key_id(key)
    raise ReleaseError(
        f"signature: not a valid Ed25519 signature of the release statement by any of the "
        f"{len(keys)} configured key(s)"
    )


def extract_archive(archive: bytes, statement: Statement, dest: Path) -> None:
    """Check ``archive`` against ``statement`` (size, sha256, then each file's sha256) and write
    its files into ``dest``. Only the statement's files, as plain top-level files, are allowed."""
    if len(archive) != statement.bundle_bytes:
        raise ReleaseError(
            f"bundle: {len(archive)} bytes received, the statement says {statement.bundle_bytes}"
        )
    got = sha256_hex(archive)
    if got != statement.bundle_sha256:
        raise ReleaseError(
            f"bundle: sha256 {got[:12]}… does not match the signed {statement.bundle_sha256[:12]}…"
        )
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            for member in tar.getmembers():
                name = member.name
                if not member.isreg() or name not in statement.files or name in seen:
                    raise ReleaseError(f"bundle: unexpected archive member {name!r}")
                f = tar.extractfile(member)
                assert f is not None
                data = f.read()
                if sha256_hex(data) != statement.files[name]:
                    raise ReleaseError(f"bundle: {name}: sha256 does not match the statement")
                (dest / name).write_bytes(data)
                seen.add(name)
    except tarfile.TarError as err:
        raise ReleaseError(f"bundle: not a valid archive: {err}") from None
    missing = sorted(set(statement.files) - seen)
    if missing:
        raise ReleaseError(f"bundle: files missing from the archive: {', '.join(missing)}")


def release_bodies(
    folder: Path, *, signed_dir: Path | None = None, chunk_bytes: int = CHUNK_BYTES
) -> list[dict[str, Any]]:
    """The ``model.release`` request bodies of the signed bundle in ``folder``, one per chunk;
    the last carries ``release`` (the statement text) and ``signature``."""
    if chunk_bytes < 1:
        raise ReleaseError(f"chunk size must be >= 1 byte, got {chunk_bytes}")
    sdir = signed_dir or folder
    try:
        statement = (sdir / STATEMENT_FILE).read_bytes()
        signature = (sdir / SIGNATURE_FILE).read_text().strip()
    except OSError as err:
        raise ReleaseError(
            f"{sdir}: no {STATEMENT_FILE}/{SIGNATURE_FILE} (run `appliance model sign` first): "
            f"{err.strerror or err}"
        ) from None
    st = parse_statement(statement)
    archive = make_archive(folder)
    if sha256_hex(archive) != st.bundle_sha256:
        raise ReleaseError(f"{folder}: the files changed since they were signed; sign again")
    parts = [archive[i : i + chunk_bytes] for i in range(0, len(archive), chunk_bytes)]
    bodies: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        body: dict[str, Any] = {
            "name": st.name,
            "version": st.version,
            "chunk": i,
            "chunks": len(parts),
            "sha256_chunk": sha256_hex(part),
            "data": base64.b64encode(part).decode(),
        }
        if i == len(parts) - 1:
            body["release"] = statement.decode()
            body["signature"] = signature
        bodies.append(body)
    return bodies
