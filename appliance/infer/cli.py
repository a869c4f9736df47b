"""``appliance engine build | list``: build engines ahead of time, show the engine cache.

``build`` is what the first boot of a device image runs, so the appliance later starts on a
cached TensorRT engine instead of building for minutes. Exit codes follow appliance/cli.py:
0 done; 1 the backend is unavailable or the build failed (the reason, never a traceback);
2 invalid configuration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any

from appliance.errors import ModelError

DEFAULT_CONFIG = "/etc/appliance/appliance.toml"
BUILD_BACKENDS = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")


def add_arguments(sp: argparse.ArgumentParser) -> None:
    """Register ``build`` and ``list`` under the ``engine`` subcommand."""
    sub = sp.add_subparsers(dest="engine_command", metavar="ACTION", required=True)
    b = sub.add_parser(
        "build",
        help="build (or find in the cache) the engine of every configured model",
        description="Build the TensorRT engine of every configured model into engine.cache_dir "
        "(a line per model: its cache key, then 'cached' or the build time). Exit 1 with the "
        "reason when the backend is not available here.",
    )
    b.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE", help="config file")
    b.add_argument(
        "--backend",
        choices=BUILD_BACKENDS,
        help="backend to build for (default: engine.backend; 'auto' means tensorrt)",
    )
    b.set_defaults(func=run_build)
    ls = sub.add_parser(
        "list",
        help="list the engine cache with keys and sizes",
        description="List the engines in engine.cache_dir: model, key, precision, TensorRT "
        "version, GPU, profile, size, build time and whether the file is intact.",
    )
    ls.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE", help="config file")
    ls.add_argument("--json", action="store_true", help="print the rows as JSON")
    ls.set_defaults(func=run_list)


def engine_for_backend(backend: str, cfg: Any, bundle: Any) -> Any:
    """The (not started) engine for ``backend`` built from the config's ``[engine]`` and
    ``[batch]`` keys, exactly as ``appliance run`` makes it (the serving chain's factories)."""
    from appliance.infer.select import FACTORIES, EngineOptions

    return FACTORIES[backend](bundle, EngineOptions.from_config(cfg, bundle))


def run_build(args: argparse.Namespace) -> int:
    from appliance.config import load_config
    from appliance.infer.bundle import load_bundle

    cfg = load_config(args.config)
    backend = args.backend or cfg.engine.backend
    if backend == "auto":
        backend = "tensorrt"
    models = [cfg.engine.model]
    if models == [""]:
        print("no model configured (engine.model is empty): nothing to build")
        return 0
    failed = 0
    for model in models:
        try:
            bundle = load_bundle(model)
            engine = engine_for_backend(backend, cfg, bundle)
            reason = engine.unavailable_reason()
            if reason is not None:
                print(f"{backend}: not available here: {reason}", file=sys.stderr)
                return 1
            t0 = time.perf_counter()
            if backend == "tensorrt":
                key = engine.key()
                print(f"{bundle.name}: {backend} {key.precision} key {key.digest[:16]} … ", end="")
                if engine.needs_build():
                    print("building… ", end="", flush=True)
                    engine.build()
                    print(f"done in {time.perf_counter() - t0:.1f} s ({engine.status})")
                else:
                    print("cached")
            else:
                print(f"{bundle.name}: {backend} … ", end="", flush=True)
            engine.start()  # loads, then the golden parity check
            if backend != "tensorrt":
                print(f"ready in {time.perf_counter() - t0:.1f} s ({engine.detail})")
            print(f"{bundle.name}: parity OK ({engine.backend}: {engine.detail})")
            engine.close()
        except ModelError as err:
            print(f"\n{model}: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def run_list(args: argparse.Namespace) -> int:
    from appliance.config import load_config
    from appliance.infer.cache import list_cache

    cfg = load_config(args.config)
    rows = list_cache(cfg.engine.cache_dir)
    if args.json:
        print(json.dumps({"cache_dir": cfg.engine.cache_dir, "engines": rows}, indent=1))
        return 0
    print(f"engine cache {cfg.engine.cache_dir}: {len(rows)} entries")
    if not rows:
        return 0
    head = ("model", "kind", "key16", "prec", "tensorrt", "gpu (cc)", "max batch", "size", "built")
    table = [head]
    for r in rows:
        if "key16" not in r:
            table.append((r["file"], "", "", "", "", "", "", "", r["state"]))
            continue
        created = (
            dt.datetime.fromtimestamp(r["created"]).isoformat(" ", "seconds")
            if r.get("created")
            else "?"
        )
        state = "" if r["state"] == "ok" else f" [{r['state']}]"
        table.append(
            (
                r["model"],
                r["kind"],
                r["key16"],
                r["precision"],
                r["trt_version"],
                f"{r['gpu_name']} ({r['compute_capability']})",
                str(r["profile"][0][3][0]) if r["profile"] else "?",
                f"{r['size']} B" if r["size"] is not None else "?",
                f"{created}, {r['build_s']:.1f} s{state}"
                if r.get("build_s") is not None
                else created + state,
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
