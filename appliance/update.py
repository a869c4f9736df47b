"""``appliance update BUNDLE``: install a release beside the running one, switch, check, and
switch back by itself when the new release does not come up.

A bundle is the tarball ``image/build`` writes (``appliance-<release>-<arch>.tar.gz``) with
its ``.sha256`` and ``.sig`` beside it. The steps, each only after the previous succeeded:

1. **Verify, touching nothing**: the tarball's sha256 equals the ``.sha256`` file's; the
   ``.sig`` is a valid Ed25519 signature of the ``.sha256`` file's bytes by one of the public
   keys in ``/etc/appliance/update-keys/*.pub``; the tarball holds exactly one release
   (``opt/appliance/releases/<release>/`` with a ``manifest.json``) and no member that is
   absolute, climbs out with ``..``, passes through a symlink, or is a device or hard link.
2. **Install beside**: the release is unpacked into ``releases/.<release>.partial``, flushed to
   disk and renamed to ``releases/<release>``; the running release is not touched.
3. **Switch**: the ``current`` symlink is replaced atomically (a new link renamed over it), the
   old target is kept as ``previous``.
4. **Restart** the service (``systemctl restart appliance.service``: with ``Type=notify`` it
   returns once the new release sent ``READY=1``, or fails), then **check**: the service is
   still active after ``settle_s``, ``--ready-url`` answers 200 when given, and the new
   release's ``appliance selftest`` passes.
5. **Roll back** when the restart or a check fails: ``current`` goes back to the previous
   release, which is restarted; the command exits 1 naming what failed.

Only ``/opt/appliance`` changes. The state directory ``/var/lib/appliance`` (outbox, alert
state, engine cache, model releases) and ``/etc/appliance`` are never written, so whatever the
outbox held before an update is delivered by whichever release runs after it. A power cut at
any point leaves ``current`` pointing at a complete release: the old one until the rename of
step 3, the new one after it (a half-unpacked release is only ever a ``.partial`` folder,
removed by the next update). The outcome of the last update is written to
``/opt/appliance/update-status.json``. Old releases beyond the newest three are removed
(never ``current`` nor ``previous``).

The root folder, the restart and the checks are parameters, so tests run an update in a
temporary folder standing in for ``/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

RELEASES_PREFIX = PurePosixPath("opt/appliance/releases")
KEEP_RELEASES = 3
SERVICE = "appliance.service"


class UpdateError(ApplianceError):
    """An update was refused (nothing was touched) or failed (and was rolled back)."""


@dataclass(frozen=True)
class Layout:
    """Where an update reads and writes, under ``root`` (``/`` on a device)."""

    root: Path

    @property
    def opt(self) -> Path:
        return self.root / "opt" / "appliance"

    @property
    def releases(self) -> Path:
        return self.opt / "releases"

    @property
    def current(self) -> Path:
        return self.opt / "current"

    @property
    def previous(self) -> Path:
        return self.opt / "previous"

    @property
    def status_file(self) -> Path:
        return self.opt / "update-status.json"

    @property
    def keys_dir(self) -> Path:
        return self.root / "etc" / "appliance" / "update-keys"

    @property
    def config(self) -> Path:
        return self.root / "etc" / "appliance" / "appliance.toml"

    def current_release(self) -> str | None:
        """The name of the release ``current`` points to (None when there is none)."""
        try:
            return Path(os.readlink(self.current)).name
        except OSError:
            return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_public_keys(keys_dir: Path) -> list[tuple[str, Any]]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys: list[tuple[str, Any]] = []
    for path in sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else []:
        try:
            key = load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as err:
            raise UpdateError(f"{path}: not a PEM public key: {err}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise UpdateError(f"{path}: not an Ed25519 public key")
        keys.append((path.name, key))
    if not keys:
        raise UpdateError(f"no update keys (*.pub) in {keys_dir}: cannot verify any bundle")
    return keys


def verify_bundle(bundle: Path, keys_dir: Path) -> str:
    """Check the bundle's sha256 and signature; its sha256 hex digest. Touches nothing."""
    from cryptography.exceptions import InvalidSignature

    sha_path = bundle.with_name(bundle.name + ".sha256")
    sig_path = bundle.with_name(bundle.name + ".sig")
    for path in (bundle, sha_path, sig_path):
        if not path.is_file():
            raise UpdateError(f"{path}: missing (a bundle is the tarball, its .sha256 and .sig)")
    sha_text = sha_path.read_bytes()
    fields = sha_text.decode("ascii", "replace").split()
    if len(fields) != 2 or len(fields[0]) != 64 or fields[1].lstrip("*") != bundle.name:
        raise UpdateError(f"{sha_path}: expected one line '<sha256>  {bundle.name}'")
    digest = sha256_file(bundle)
    if digest != fields[0].lower():
        raise UpdateError(f"{bundle}: sha256 {digest} does not match {sha_path} ({fields[0]})")
    signature = sig_path.read_bytes()
    for name, key in _load_public_keys(keys_dir):
        try:
            key.verify(signature, sha_text)
        except InvalidSignature:
            continue
        log.info("update: %s verified (sha256 %s, signed by %s)", bundle.name, digest, name)
        return digest
    raise UpdateError(f"{sig_path}: not a valid signature by any key in {keys_dir}")


def inspect_bundle(bundle: Path) -> tuple[str, dict[str, Any]]:
    """The release name and manifest of a verified bundle, after checking every member is safe
    to unpack. Touches nothing."""
    releases: set[str] = set()
    links: set[PurePosixPath] = set()
    manifest: dict[str, Any] | None = None
    with tarfile.open(bundle, "r:*") as tar:
        for m in tar.getmembers():
            path = PurePosixPath(m.name)
            if path.is_absolute() or ".." in path.parts:
                raise UpdateError(f"{bundle}: member {m.name!r} escapes the root")
            if not (m.isfile() or m.isdir() or m.issym()):
                raise UpdateError(f"{bundle}: member {m.name!r} is not a file, folder or symlink")
            if any(parent in links for parent in path.parents):
                raise UpdateError(f"{bundle}: member {m.name!r} lies behind a symlink")
            if m.issym():
                links.add(path)
            if len(path.parts) > 3 and path.parts[:3] == RELEASES_PREFIX.parts:
                releases.add(path.parts[3])
                if path.parts[4:] == ("manifest.json",):
                    f = tar.extractfile(m)
                    assert f is not None
                    manifest = json.loads(f.read())
        if len(releases) != 1 or manifest is None:
            raise UpdateError(
                f"{bundle}: expected one release with a manifest.json under "
                f"{RELEASES_PREFIX}/, found {sorted(releases) or 'none'}"
            )
    (release,) = releases
    if release.startswith(".") or release in ("current", "previous"):
        raise UpdateError(f"{bundle}: invalid release name {release!r}")
    return release, manifest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_release(bundle: Path, layout: Layout, release: str) -> Path:
    """Unpack the release folder of an inspected bundle beside the others; its final path."""
    final = layout.releases / release
    partial = layout.releases / f".{release}.partial"
    layout.releases.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    if final.exists():  # left by an earlier attempt that was rolled back: reinstall it
        shutil.rmtree(final)
    prefix = RELEASES_PREFIX / release
    files: list[Path] = []
    with tarfile.open(bundle, "r:*") as tar:
        for m in tar.getmembers():
            path = PurePosixPath(m.name)
            if path != prefix and prefix not in path.parents:
                continue
            dest = partial.joinpath(*path.relative_to(prefix).parts)
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                dest.chmod(m.mode & 0o7755 | 0o700)
            elif m.issym():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(m.linkname, dest)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, dest.open("xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                dest.chmod(m.mode & 0o755)
                files.append(dest)
    for written in files:  # durable before the rename makes the release visible
        fd = os.open(written, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.rename(partial, final)
    _fsync_dir(layout.releases)
    return final


def switch_current(layout: Layout, release: str) -> None:
    """Point ``current`` at ``releases/<release>`` atomically (rename of a new link over it)."""
    tmp = layout.opt / f".current.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(f"releases/{release}", tmp)
    os.replace(tmp, layout.current)
    _fsync_dir(layout.opt)


def _set_previous(layout: Layout, release: str) -> None:
    tmp = layout.opt / f".previous.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(f"releases/{release}", tmp)
    os.replace(tmp, layout.previous)


def _write_status(layout: Layout, status: dict[str, Any]) -> None:
    tmp = layout.status_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, layout.status_file)


def prune_releases(layout: Layout, keep: int = KEEP_RELEASES) -> list[str]:
    """Remove the oldest releases beyond ``keep`` (by modification time), never ``current``
    nor ``previous``; the names removed."""
    protect = {layout.current_release()}
    with contextlib.suppress(OSError):
        protect.add(Path(os.readlink(layout.previous)).name)
    found = sorted(
        (p for p in layout.releases.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    removed = []
    for path in found[keep:]:
        if path.name not in protect:
            shutil.rmtree(path)
            removed.append(path.name)
    return removed


# -- restart and checks (the seams) ----------------------------------------------------------


def systemctl_restart(layout: Layout) -> None:
    """``systemctl restart appliance.service``; with ``Type=notify`` it returns when the new
    process sent ``READY=1`` and fails when it exits or times out first."""
    proc = subprocess.run(
        ["systemctl", "restart", SERVICE], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise UpdateError(f"systemctl restart {SERVICE} failed: {proc.stderr.strip()}")


def systemctl_still_active(settle_s: float) -> Callable[[Layout], None]:
    def check(layout: Layout) -> None:
        time.sleep(settle_s)
        proc = subprocess.run(
            ["systemctl", "is-active", SERVICE], capture_output=True, text=True, timeout=60
        )
        if proc.stdout.strip() != "active":
            raise UpdateError(f"{SERVICE} is {proc.stdout.strip()} {settle_s:g} s after start")

    return check


def ready_url_check(url: str, timeout_s: float) -> Callable[[Layout], None]:
    """Poll ``url`` until it answers 200 (the local API's ``/ready``)."""

    def check(layout: Layout) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
            except OSError as err:
                last = str(err)
            time.sleep(1.0)
        raise UpdateError(f"{url} not ready within {timeout_s:g} s ({last})")

    return check


def selftest_check(timeout_s: float, iterations: int = 20) -> Callable[[Layout], None]:
    """Run the current release's ``appliance selftest`` with the device's config."""

    def check(layout: Layout) -> None:
        exe = layout.current / "venv" / "bin" / "appliance"
        cmd = [str(exe), "selftest", "--iterations", str(iterations)]
        if layout.config.is_file():
            cmd += ["-c", str(layout.config)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UpdateError(f"selftest did not finish within {timeout_s:g} s") from None
        except OSError as err:
            raise UpdateError(f"selftest could not run: {exe}: {err}") from None
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            raise UpdateError(f"selftest failed (exit {proc.returncode}): {' | '.join(tail)}")

    return check


# -- the update ------------------------------------------------------------------------------


def update(
    bundle: Path,
    layout: Layout,
    *,
    restart: Callable[[Layout], None] | None,
    checks: list[Callable[[Layout], None]],
) -> dict[str, Any]:
    """Verify, install, switch, restart, check; roll back on failure. Returns the status
    written to ``update-status.json``; raises :class:`UpdateError` when refused or rolled back.
    ``restart`` None: the service is not restarted (no systemd, or ``--no-restart``)."""
    bundle = Path(bundle)
    digest = verify_bundle(bundle, layout.keys_dir)
    release, manifest = inspect_bundle(bundle)
    old = layout.current_release()
    if release == old:
        raise UpdateError(f"release {release} is already current")
    status: dict[str, Any] = {
        "bundle": bundle.name,
        "sha256": digest,
        "release": release,
        "version": manifest.get("version"),
        "previous": old,
        "started": time.time(),
    }
    install_release(bundle, layout, release)
    log.info("update: release %s installed beside %s", release, old)
    if old is not None:
        _set_previous(layout, old)
    switch_current(layout, release)
    log.info("update: current → %s", release)
    try:
        if restart is not None:
            restart(layout)
        for check in checks:
            check(layout)
    except (UpdateError, OSError, subprocess.SubprocessError) as err:
        status.update(outcome="rolled back", error=str(err), finished=time.time())
        log.error("update to %s failed: %s; rolling back to %s", release, err, old)
        if old is None:
            _write_status(layout, status)
            raise UpdateError(f"update to {release} failed: {err} (no previous release)") from None
        switch_current(layout, old)
        if restart is not None:
            try:
                restart(layout)
            except (UpdateError, OSError, subprocess.SubprocessError) as again:
                status["rollback_error"] = str(again)
        _write_status(layout, status)
        raise UpdateError(f"update to {release} failed: {err}; rolled back to {old}") from None
    status.update(outcome="ok", finished=time.time(), pruned=prune_releases(layout))
    _write_status(layout, status)
    return status


def add_arguments(sp: Any) -> None:
    """The ``appliance update`` command line (registered by appliance/cli.py)."""
    sp.add_argument("bundle", metavar="BUNDLE", help="appliance-<release>-<arch>.tar.gz")
    sp.add_argument(
        "--root", default="/", metavar="DIR", help="the filesystem root to update (default: /)"
    )
    sp.add_argument(
        "--no-restart",
        action="store_true",
        help="do not restart the service (default: restart when systemctl exists and --root "
        "is /); the selftest still runs and a failure still rolls back",
    )
    sp.add_argument(
        "--ready-url",
        metavar="URL",
        help="also wait for this URL to answer 200 after the restart (the local API's /ready)",
    )
    sp.add_argument(
        "--settle-s",
        type=float,
        default=10.0,
        metavar="S",
        help="after the restart, the service must still be active this long (default 10)",
    )
    sp.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        metavar="S",
        help="for the selftest and --ready-url each (default 300)",
    )
    sp.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    layout = Layout(Path(args.root))
    systemd = shutil.which("systemctl") is not None and layout.root.resolve() == Path("/")
    restart = systemctl_restart if systemd and not args.no_restart else None
    checks: list[Callable[[Layout], None]] = []
    if restart is not None:
        checks.append(systemctl_still_active(args.settle_s))
    if args.ready_url:
        checks.append(ready_url_check(args.ready_url, args.timeout_s))
    checks.append(selftest_check(args.timeout_s))
    if restart is None:
        print("appliance update: not restarting the service (no systemd, --root or --no-restart)")
    status = update(Path(args.bundle), layout, restart=restart, checks=checks)
    print(
        f"appliance update: release {status['release']} is current "
        f"(was {status['previous']}); sha256 {status['sha256']}"
    )
    return 0
