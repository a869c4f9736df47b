"""``appliance selftest``: the acceptance check of the inference backends on this host.

For every backend the appliance knows (all of :data:`~appliance.infer.select.FACTORIES`, whatever
``engine.backend`` says) and every configured model: create it; when absent, say why; else build
it if it needs a build, load it, measure its parity error against the model's golden vectors
(pass = within the manifest's ``golden_atol``), then time ``infer()`` at batch 1 and at the
configured ``batch.max_batch``: latency p50/p99 (µs) and rows/s. Passes when at least one backend
passes. Runs in the calling thread; takes a few seconds on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.infer.bundle import ModelBundle, load_bundle
from appliance.infer.select import (
    FACTORIES,
    BackendFactory,
    BackendUnavailable,
    EngineOptions,
)

PASS, FAIL, ABSENT = "pass", "fail", "absent"


def _timed(engine: Any, batch: np.ndarray, iterations: int) -> dict[str, float]:
    """Latency percentiles (µs) and rows/s of ``engine.infer(batch)``, after a short warm-up."""
    for _ in range(min(10, iterations)):
        engine.infer(batch)
    times = np.empty(iterations, np.float64)
    for i in range(iterations):
        t0 = time.perf_counter()
        engine.infer(batch)
        times[i] = time.perf_counter() - t0
    return {
        "batch": len(batch),
        "iterations": iterations,
        "p50_us": float(np.percentile(times, 50) * 1e6),
        "p99_us": float(np.percentile(times, 99) * 1e6),
        "rows_per_s": float(len(batch) * iterations / times.sum()),
    }


def check_backend(
    name: str,
    factory: BackendFactory,
    bundle: ModelBundle,
    options: EngineOptions,
    max_batch: int,
    iterations: int,
) -> dict[str, Any]:
    """One row of the report: build/load/parity/latency of one backend on one model."""
    row: dict[str, Any] = {
        "model": bundle.name,
        "model_version": bundle.version,
        "backend": name,
        "status": ABSENT,
        "reason": "",
        "detail": "",
        "parity_max_abs_err": None,
        "golden_atol": bundle.golden_atol,
        "build_s": None,
        "load_s": None,
        "latency": [],
    }
    try:
        engine = factory(bundle, options)
        why = engine.unavailable_reason()
    except (BackendUnavailable, ImportError) as err:
        why = str(err) or type(err).__name__
    except Exception as err:
        row.update(status=FAIL, reason=f"cannot be set up: {err}")
        return row
    if why is not None:
        row["reason"] = why
        return row
    row["status"] = FAIL
    try:
        if engine.needs_build():
            t0 = time.perf_counter()
            engine.build()
            row["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            engine.start()
        finally:
            row["load_s"] = time.perf_counter() - t0
        row["detail"] = engine.detail
        row["parity_max_abs_err"] = engine.check_parity()
        row["latency"] = [_timed(engine, bundle.golden_inputs[:1], iterations)]
        if max_batch > 1:
            reps = -(-max_batch // len(bundle.golden_inputs))
            big = np.ascontiguousarray(np.tile(bundle.golden_inputs, (reps, 1))[:max_batch])
            row["latency"].append(_timed(engine, big, iterations))
        row["status"] = PASS
    except Exception as err:  # any failure of a backend is a result here, not a crash
        row["reason"] = str(err) or type(err).__name__
        if row["parity_max_abs_err"] is None:
            row["parity_max_abs_err"] = _parity_if_loaded(engine, bundle)
    finally:
        try:
            engine.close()
        except Exception as err:
            row["reason"] = (row["reason"] + f"; close failed: {err}").lstrip("; ")
    return row


def _parity_if_loaded(engine: Any, bundle: ModelBundle) -> float | None:
    """The parity error of an engine that loaded but refused to serve (so the report shows by
    how much it missed), or None when it never loaded."""
    try:
        got = engine.infer(bundle.golden_inputs)
    except Exception:
        return None
    return float(np.max(np.abs(got - bundle.golden_outputs)))


def run_selftest(
    models: Sequence[str],
    cfg: Config,
    *,
    iterations: int = 200,
    factories: Mapping[str, BackendFactory] | None = None,
    order: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Check every backend in ``order`` (default: every backend the appliance knows, forced or
    automatic) on every model, with the engine options of ``cfg``; the report as a JSON-able
    dict (``passed``: every model loads and passes on at least one backend)."""
    table = FACTORIES if factories is None else factories
    order = list(table) if order is None else order
    max_batch = cfg.batch.max_batch
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    names: list[str] = []
    for model in models:
        try:
            bundle = load_bundle(model)
        except ApplianceError as err:
            errors.append(str(err))
            continue
        names.append(bundle.name)
        opts = EngineOptions.from_config(cfg, bundle)
        for name in order:
            results.append(check_backend(name, table[name], bundle, opts, max_batch, iterations))
    return {
        "models": list(models),
        "max_batch": max_batch,
        "iterations": iterations,
        "results": results,
        "model_errors": errors,
        # every model loads and has at least one backend that passes
        "passed": not errors
        and all(any(r["status"] == PASS for r in results if r["model"] == b) for b in names),
    }


def _num(v: float | None, scale: float = 1.0) -> str:
    return "-" if v is None else f"{v * scale:g}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (full-precision figures are in the JSON)."""
    mb = report["max_batch"]
    head = (
        f"{'model':<14} {'backend':<20} {'status':<7} {'parity err':>11} {'atol':>7} "
        f"{'build s':>8} {'load s':>8} {'b1 p50 µs':>10} {'b1 p99 µs':>10} "
        f"{f'b{mb} p50 µs':>11} {f'b{mb} p99 µs':>11} {f'b{mb} rows/s':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        lat = r["latency"]
        b1 = lat[0] if lat else {}
        bm = lat[-1] if lat else {}
        line = (
            f"{r['model']:<14} {r['backend']:<20} {r['status'].upper():<7} "
            f"{_num(r['parity_max_abs_err']):>11} {_num(r['golden_atol']):>7} "
            f"{_num(r['build_s']):>8} {_num(r['load_s']):>8} "
            f"{_num(b1.get('p50_us')):>10} {_num(b1.get('p99_us')):>10} "
            f"{_num(bm.get('p50_us')):>11} {_num(bm.get('p99_us')):>11} "
            f"{_num(bm.get('rows_per_s')):>12}"
        )
        lines.append(line.rstrip())
        if r["reason"]:
            lines.append(f"{'':<14} └ {r['reason']}")
        elif r["detail"]:
            lines.append(f"{'':<14} └ {r['detail']}")
    for err in report["model_errors"]:
        lines.append(f"model error: {err}")
    n_pass = sum(r["status"] == PASS for r in report["results"])
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"selftest {verdict}: {n_pass} of {len(report['results'])} backend checks pass")
    return "\n".join(lines)
