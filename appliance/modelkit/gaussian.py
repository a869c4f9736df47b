"""Gaussian (Mahalanobis) anomaly score over a window feature vector.

score = sqrt(mean(((x - mean) @ W)²)) / s_ref with W Wᵀ = (Σ + λI)⁻¹ in standardised units, and
s_ref the chosen quantile of that distance over the normal training windows: 1.0 is the alert
threshold (a normal window exceeds it with probability 1 - quantile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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
        from onnx import TensorProto, helper, numpy_helper

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
        return helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", f])],
            [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
            initializer=inits,
        )


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
