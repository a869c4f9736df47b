"""Autoencoder anomaly score over a window feature vector (trained with PyTorch, CPU).

Standardised features z = (x - mean) / std go through a small MLP (F → H → B → H → F, ReLU);
the score is the mean squared reconstruction error divided by its ``quantile`` over the normal
training windows (1.0 = threshold). Training needs the ``train`` extra (PyTorch); the ONNX graph
is written from the trained weights with plain ``MatMul``/``Add``/``Relu`` nodes, so the export
does not depend on torch's exporter and stays in the opset TensorRT accepts. The appliance never
imports torch: serving runs the ONNX file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from appliance.errors import ApplianceError
from appliance.modelkit.export import score_graph

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class AutoencoderModel:
    mean: F64
    std: F64
    weights: tuple[F64, ...]  # W1, W2, W3, W4 ([in, out])
    biases: tuple[F64, ...]
    s_ref: float

    def score(self, x: npt.ArrayLike) -> F64:
        """NumPy reference of the ONNX graph (float64)."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.std
        h = z
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < last:
                h = np.maximum(h, 0.0)
        err: F64 = np.mean((h - z) ** 2, axis=1) / self.s_ref
        return err

    def onnx_graph(self, name: str) -> object:
        from onnx import helper, numpy_helper

        f = len(self.mean)
        inits = [
            numpy_helper.from_array(self.mean.astype(np.float32), "mean"),
            numpy_helper.from_array((1.0 / self.std).astype(np.float32), "inv_std"),
            numpy_helper.from_array(np.array(1.0 / self.s_ref, np.float32), "inv_sref"),
        ]
        nodes = [
            helper.make_node("Sub", ["features", "mean"], ["centred"]),
            helper.make_node("Mul", ["centred", "inv_std"], ["z"]),
        ]
        h = "z"
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            inits += [
                numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
            ]
            nodes += [
                helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]),
                helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"a{i}"]),
            ]
            h = f"a{i}"
            if i < last:
                nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
                h = f"r{i}"
        nodes += [
            helper.make_node("Sub", [h, "z"], ["diff"]),
            helper.make_node("Mul", ["diff", "diff"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["mse"], axes=[1], keepdims=0),
            helper.make_node("Mul", ["mse", "inv_sref"], ["score"]),
        ]
        return score_graph(nodes, name, f, inits)


def fit_autoencoder(
    x: npt.ArrayLike,
    quantile: float = 0.999,
    *,
    hidden: int = 32,
    bottleneck: int | None = None,
    epochs: int = 60,
    seed: int = 0,
) -> AutoencoderModel:
    """Train on normal windows ``x`` [W, F] (deterministic per ``seed``, CPU)."""
    try:
        import torch
    except ImportError:
        raise ApplianceError(
            "the autoencoder needs PyTorch: pip install 'cnc-edge-appliance[train]'"
        ) from None
    xx = np.asarray(x, dtype=np.float64)
    mean = xx.mean(axis=0)
    std = np.maximum(xx.std(axis=0), 1e-6 * np.abs(mean) + 1e-9)
    z = torch.tensor((xx - mean) / std, dtype=torch.float32)
    f = z.shape[1]
    b = bottleneck or max(2, f // 4)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(f, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, b),
        torch.nn.ReLU(),
        torch.nn.Linear(b, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, f),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    n = z.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 128):
            batch = z[perm[i : i + 128]]
            opt.zero_grad()
            loss = torch.mean((net(batch) - batch) ** 2)
            loss.backward()  # type: ignore[no-untyped-call,unused-ignore]
            opt.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    weights = tuple(m.weight.detach().numpy().T.astype(np.float64) for m in linears)
    biases = tuple(m.bias.detach().numpy().astype(np.float64) for m in linears)
    model = AutoencoderModel(mean, std, weights, biases, 1.0)
    s_ref = float(np.quantile(model.score(xx), quantile))
    return AutoencoderModel(mean, std, weights, biases, max(s_ref, 1e-12))
