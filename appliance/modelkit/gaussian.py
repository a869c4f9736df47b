"""Gaussian (Mahalanobis) anomaly score over a window feature vector.

score = sqrt(mean(((x - mean) @ W)²)) / s_ref with W Wᵀ = (Σ + λI)⁻¹ in standardised units, and
s_ref the chosen quantile of that distance over the normal training windows: 1.0 is the alert
threshold (a normal window exceeds it with probability 1 - quantile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.modelkit.export import score_graph
from appliance.modelkit.recording import DataError

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class GaussianModel:
    mean: F64
    whiten: F64
    s_ref: float

    def score(self, x: npt.ArrayLike) -> F64:
        """NumPy reference of the ONNX graph (float64)."""
        xx = np.asarray(x, dtype=np.float64)
        d: F64 = np.sqrt(np.mean(((xx - self.mean) @ self.whiten) ** 2, axis=1)) / self.s_ref
        return d

    def onnx_graph(self, name: str) -> object:
        from onnx import helper, numpy_helper

        f = len(self.mean)
        inits = [
            numpy_helper.from_array(self.mean.astype(np.float32), "mean"),
            numpy_helper.from_array(self.whiten.astype(np.float32), "whiten"),
            numpy_helper.from_array(np.array(1.0 / self.s_ref, np.float32), "inv_sref"),
        ]
        nodes = [
            helper.make_node("Sub", ["features", "mean"], ["centred"]),
            helper.make_node("MatMul", ["centred", "whiten"], ["y"]),
            helper.make_node("Mul", ["y", "y"], ["y2"]),
            helper.make_node("ReduceMean", ["y2"], ["msq"], axes=[1], keepdims=0),
            helper.make_node("Sqrt", ["msq"], ["dist"]),
            helper.make_node("Mul", ["dist", "inv_sref"], ["score"]),
        ]
        return score_graph(nodes, name, f, inits)


def fit_gaussian(x: npt.ArrayLike, quantile: float = 0.999, ridge: float = 1e-3) -> GaussianModel:
    """Fit on normal windows ``x`` [W, F]; the threshold (score 1.0) at ``quantile``."""
    xx = np.asarray(x, dtype=np.float64)
    mean = xx.mean(axis=0)
    std = xx.std(axis=0)
    std = np.maximum(std, 1e-6 * np.abs(mean) + 1e-9)
    z = (xx - mean) / std
    cov = np.cov(z, rowvar=False) + ridge * np.eye(xx.shape[1])
    chol = np.linalg.cholesky(np.linalg.inv(cov))
    w = chol / std[:, None]
    d = np.sqrt(np.mean(((xx - mean) @ w) ** 2, axis=1))
    s_ref = float(np.quantile(d, quantile))
    return GaussianModel(mean, w, s_ref)


@dataclass(frozen=True)
class ContextGaussianModel:
    """One Gaussian score per context value, and the global one for any other value.

    The input row is the base features followed by the context value (the context channel's
    ``last`` sample of the window). The row is scored by the Gaussian of the value equal to it
    (float32 equality, as in the graph), or by ``fallback`` (fitted on all windows) when no
    value is: an unknown context is scored, not dropped. Each model's score is 1.0 at the
    fit's quantile of its own windows.
    """

    values: F64  # [K] the context values with their own model
    models: tuple[GaussianModel, ...]  # [K]
    fallback: GaussianModel

    def _index(self, ctx: F64) -> npt.NDArray[np.intp]:
        """Per row: the model index, K (the fallback) for an unknown context."""
        eq = ctx.astype(np.float32)[:, None] == self.values.astype(np.float32)[None, :]
        return np.where(eq.any(axis=1), eq.argmax(axis=1), len(self.values))

    def score(self, x: npt.ArrayLike) -> F64:
        """NumPy reference of the ONNX graph (float64)."""
        xx = np.asarray(x, dtype=np.float64)
        base, idx = xx[:, :-1], self._index(xx[:, -1])
        out = np.empty(len(xx))
        for k, m in enumerate((*self.models, self.fallback)):
            rows = idx == k
            if rows.any():
                out[rows] = m.score(base[rows])
        return out

    def onnx_graph(self, name: str) -> object:
        from onnx import TensorProto, helper, numpy_helper

        every = (*self.models, self.fallback)
        f = len(self.fallback.mean)
        inits = [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([f], np.int64), "f"),
            numpy_helper.from_array(np.array([f + 1], np.int64), "f1"),
            numpy_helper.from_array(
                np.stack([m.mean for m in every])[:, None, :].astype(np.float32), "means"
            ),
            numpy_helper.from_array(np.stack([m.whiten for m in every]).astype(np.float32), "W"),
            numpy_helper.from_array(
                np.array([[1.0 / m.s_ref] for m in every], np.float32), "inv_sref"
            ),
            numpy_helper.from_array(self.values.astype(np.float32), "values"),
            numpy_helper.from_array(np.ones((1, 1), np.float32), "ones"),
        ]
        nodes = [
            # base features [N, F] and the context value [N, 1]
            helper.make_node("Slice", ["features", "zero", "f", "one"], ["x"]),
            helper.make_node("Slice", ["features", "f", "f1", "one"], ["ctx"]),
            # every model's Mahalanobis score: [K+1, N]
            helper.make_node("Unsqueeze", ["x", "zero"], ["x1"]),
            helper.make_node("Sub", ["x1", "means"], ["centred"]),
            helper.make_node("MatMul", ["centred", "W"], ["y"]),
            helper.make_node("Mul", ["y", "y"], ["y2"]),
            helper.make_node("ReduceMean", ["y2"], ["msq"], axes=[2], keepdims=0),
            helper.make_node("Sqrt", ["msq"], ["dist"]),
            helper.make_node("Mul", ["dist", "inv_sref"], ["scores_kn"]),
            helper.make_node("Transpose", ["scores_kn"], ["scores"], perm=[1, 0]),
            # one-hot of the context value over the K values, then "none of them" → fallback
            helper.make_node("Equal", ["ctx", "values"], ["eq"]),
            helper.make_node("Cast", ["eq"], ["onehot"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", ["onehot"], ["known"], axes=[1], keepdims=1),
            helper.make_node("Sub", ["ones", "known"], ["unknown"]),
            helper.make_node("Concat", ["onehot", "unknown"], ["select"], axis=1),
            helper.make_node("Mul", ["select", "scores"], ["picked"]),
            helper.make_node("ReduceSum", ["picked", "one"], ["score"], keepdims=0),
        ]
        return score_graph(nodes, name, f + 1, inits)


def fit_context_gaussian(
    x: npt.ArrayLike,
    quantile: float,
    min_windows: int,
    channel: str,
    labels: Sequence[str] | None = None,
) -> tuple[ContextGaussianModel, dict[str, Any]]:
    """Fit on normal windows ``x`` [W, F + 1] whose last column is the context value: one
    Gaussian per value with at least ``min_windows`` windows, the global one on all windows.
    Returns the model and the manifest's ``context`` entry (docs/models.md)."""
    xx = np.asarray(x, dtype=np.float64)
    base, ctx = xx[:, :-1], xx[:, -1]
    values, counts = np.unique(ctx, return_counts=True)
    keep = counts >= min_windows

    def named(v: float) -> str:
        return labels[int(v)] if labels is not None and 0 <= v < len(labels) else f"{v:g}"

    if not keep.any():
        raise DataError(
            f"context {channel!r}: no value has {min_windows} windows to fit its own model on "
            f"(most: {named(float(values[counts.argmax()]))} with {int(counts.max())})"
        )
    models = tuple(fit_gaussian(base[ctx == v], quantile) for v in values[keep])
    fallback = fit_gaussian(base, quantile)
    info: dict[str, Any] = {
        "channel": channel,
        "stat": "last",
        "values": [float(v) for v in values[keep]],
        "windows": [int(c) for c in counts[keep]],
        "unknown": "global",
        "global_windows": int(len(xx)),
        "too_few_windows": [named(float(v)) for v in values[~keep]],
    }
    if labels is not None:
        info["labels"] = list(labels)
    return ContextGaussianModel(values[keep], models, fallback), info


def fit_conditional_gaussian(
    x: npt.ArrayLike, given: Sequence[int], quantile: float = 0.999, ridge: float = 1e-3
) -> GaussianModel:
    """Fit on normal windows ``x`` [W, F] a Gaussian of the other features *given* the columns
    ``given`` (the operating point, e.g. spindle speed and load): each other feature's residual
    from its linear regression on ``given`` (standardised units), whitened by the residuals'
    covariance. The score is the Mahalanobis distance of the residuals only, so a window is not
    anomalous for running at an unusual speed or load, only for what it shows at that speed and
    load. Same graph as :func:`fit_gaussian` (``whiten`` is [F, F - len(given)]: the regression
    is folded into it); the threshold (score 1.0) at ``quantile``."""
    xx = np.asarray(x, dtype=np.float64)
    f = xx.shape[1]
    g = sorted(set(given))
    if not g or g[0] < 0 or g[-1] >= f or len(g) == f:
        raise ValueError(f"given must name some but not all of the {f} columns, got {given}")
    t = [j for j in range(f) if j not in g]
    mean = xx.mean(axis=0)
    std = xx.std(axis=0)
    std = np.maximum(std, 1e-6 * np.abs(mean) + 1e-9)
    z = (xx - mean) / std
    cov = np.cov(z, rowvar=False) + ridge * np.eye(f)
    b = np.linalg.solve(cov[np.ix_(g, g)], cov[np.ix_(g, t)])  # [G, T] regression
    a = np.zeros((f, len(t)))  # z @ a = the residuals
    a[t, np.arange(len(t))] = 1.0
    a[g, :] = -b
    r = z @ a
    cov_r = np.cov(r, rowvar=False).reshape(len(t), len(t)) + ridge * np.eye(len(t))
    chol = np.linalg.cholesky(np.linalg.inv(cov_r))
    w = (a / std[:, None]) @ chol
    d = np.sqrt(np.mean(((xx - mean) @ w) ** 2, axis=1))
    s_ref = float(np.quantile(d, quantile))
    return GaussianModel(mean, w, s_ref)


@dataclass(frozen=True)
class GaussianBank:
    """Several Gaussian scores over one feature vector, each over its own columns and with its
    own threshold; the score is the largest of them (each already divided by its ``s_ref``, so
    1.0 is every part's threshold). A fault that moves one part's few features is then not
    averaged away by the others' (a Mahalanobis distance over all features would)."""

    mean: F64  # [F]
    whiten: F64  # [F, T]: the parts' whitening matrices side by side, zero rows where unused
    pool: F64  # [T, K]: 1 / T_k where column t belongs to part k
    s_ref: F64  # [K]

    def part_scores(self, x: npt.ArrayLike) -> F64:
        """[N, K] score of each part (NumPy reference of the graph, float64)."""
        xx = np.asarray(x, dtype=np.float64)
        d: F64 = np.sqrt((((xx - self.mean) @ self.whiten) ** 2) @ self.pool) / self.s_ref
        return d

    def score(self, x: npt.ArrayLike) -> F64:
        out: F64 = self.part_scores(x).max(axis=1)
        return out

    def onnx_graph(self, name: str) -> object:
        from onnx import helper, numpy_helper

        f = len(self.mean)
        inits = [
            numpy_helper.from_array(self.mean.astype(np.float32), "mean"),
            numpy_helper.from_array(self.whiten.astype(np.float32), "whiten"),
            numpy_helper.from_array(self.pool.astype(np.float32), "pool"),
            numpy_helper.from_array((1.0 / self.s_ref).astype(np.float32), "inv_sref"),
        ]
        nodes = [
            helper.make_node("Sub", ["features", "mean"], ["centred"]),
            helper.make_node("MatMul", ["centred", "whiten"], ["y"]),
            helper.make_node("Mul", ["y", "y"], ["y2"]),
            helper.make_node("MatMul", ["y2", "pool"], ["msq"]),
            helper.make_node("Sqrt", ["msq"], ["dist"]),
            helper.make_node("Mul", ["dist", "inv_sref"], ["parts"]),
            helper.make_node("ReduceMax", ["parts"], ["score"], axes=[1], keepdims=0),
        ]
        return score_graph(nodes, name, f, inits)


def fit_gaussian_bank(
    x: npt.ArrayLike,
    parts: Sequence[tuple[Sequence[int], Sequence[int]]],
    quantile: float = 0.999,
    ridge: float = 1e-3,
) -> GaussianBank:
    """A :class:`GaussianBank` of conditional Gaussians: part k scores columns ``targets``
    given columns ``given`` (:func:`fit_conditional_gaussian` on those columns; no ``given``:
    :func:`fit_gaussian`), each with its threshold at ``quantile`` of the normal windows."""
    xx = np.asarray(x, dtype=np.float64)
    f = xx.shape[1]
    if not parts:
        raise ValueError("a bank needs at least one part")
    blocks: list[F64] = []
    sizes: list[int] = []
    refs: list[float] = []
    for given, targets in parts:
        cols = [*given, *targets]
        if len(set(cols)) != len(cols) or not targets or min(cols) < 0 or max(cols) >= f:
            raise ValueError(f"part (given {list(given)}, targets {list(targets)}) of {f} columns")
        sub = xx[:, cols]
        g = (
            fit_conditional_gaussian(sub, range(len(given)), quantile, ridge)
            if given
            else (fit_gaussian(sub, quantile, ridge))
        )
        w = np.zeros((f, g.whiten.shape[1]))
        w[cols, :] = g.whiten
        blocks.append(w)
        sizes.append(g.whiten.shape[1])
        refs.append(g.s_ref)
    whiten = np.hstack(blocks)
    pool = np.zeros((whiten.shape[1], len(parts)))
    start = 0
    for k, n in enumerate(sizes):
        pool[start : start + n, k] = 1.0 / n
        start += n
    return GaussianBank(xx.mean(axis=0), whiten, pool, np.asarray(refs, dtype=np.float64))
