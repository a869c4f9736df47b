"""A small CNN fault classifier over spectrogram images (trained with PyTorch, CPU).

Input: the feature vector of a bundle whose features are one spectrogram image
(:class:`~appliance.contracts.SpectrogramSpec`, ``height × width`` columns, row-major), reshaped
in the graph to ``[N, 1, height, width]``. Network: three 3×3 convolutions (ReLU; 2×2 max-pool
after the first two), the mean over the time axis, one fully connected layer to the class
logits, softmax. Outputs: ``score`` [N] = (1 − P(healthy)) / ``p_ref`` (1.0 = threshold), the
served output; and ``class_probs`` [N, K], the per-class probabilities (class 0 is healthy),
which serving ignores and ``models/quality.py`` uses for its confusion matrix. 1 − P(healthy)
is computed as the sum of the other classes' probabilities, so that it keeps its precision when
it is tiny.

The ONNX graph is written from the trained weights with plain ``Reshape``/``Conv``/``Relu``/
``MaxPool``/``ReduceMean``/``Flatten``/``Gemm``/``Softmax``/``Slice``/``ReduceSum``/``Mul``
nodes (opset 17), so the export does not depend on torch's exporter and TensorRT 10.3 compiles
it. The appliance never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.errors import ApplianceError
from appliance.modelkit.export import score_graph

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Output channels of the three convolutions.
CHANNELS = (8, 16, 16)


@dataclass(frozen=True)
class CnnModel:
    height: int
    width: int
    classes: tuple[str, ...]  # classes[0] is the healthy class
    #: conv weights [out, in, 3, 3] and biases, then the dense layer's [K, C·H/4] and [K]
    conv_w: tuple[F32, ...]
    conv_b: tuple[F32, ...]
    fc_w: F32
    fc_b: F32
    p_ref: float  # 1 − P(healthy) that scores 1.0

    def onnx_graph(self, name: str) -> Any:
        from onnx import TensorProto, helper, numpy_helper

        k = len(self.classes)
        f = self.height * self.width
        inits = [
            numpy_helper.from_array(np.array([-1, 1, self.height, self.width], np.int64), "shape"),
            numpy_helper.from_array(np.array([1], np.int64), "one_i"),
            numpy_helper.from_array(np.array([k], np.int64), "k_i"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array(1.0 / self.p_ref, np.float32), "inv_pref"),
            numpy_helper.from_array(self.fc_w.astype(np.float32), "fc_w"),
            numpy_helper.from_array(self.fc_b.astype(np.float32), "fc_b"),
        ]
        nodes = [helper.make_node("Reshape", ["features", "shape"], ["img"])]
        h = "img"
        for i, (w, b) in enumerate(zip(self.conv_w, self.conv_b, strict=True)):
            inits += [
                numpy_helper.from_array(w.astype(np.float32), f"conv{i}_w"),
                numpy_helper.from_array(b.astype(np.float32), f"conv{i}_b"),
            ]
            nodes += [
                helper.make_node(
                    "Conv", [h, f"conv{i}_w", f"conv{i}_b"], [f"c{i}"], pads=[1, 1, 1, 1]
                ),
                helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            ]
            h = f"r{i}"
            if i < len(self.conv_w) - 1:
                nodes.append(
                    helper.make_node("MaxPool", [h], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2])
                )
                h = f"p{i}"
        nodes += [
            helper.make_node("ReduceMean", [h], ["over_time"], axes=[3], keepdims=0),
            helper.make_node("Flatten", ["over_time"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
            helper.make_node("Softmax", ["logits"], ["class_probs"], axis=1),
            helper.make_node("Slice", ["class_probs", "one_i", "k_i", "axis1"], ["faulty"]),
            helper.make_node("ReduceSum", ["faulty", "axis1"], ["p_fault"], keepdims=0),
            helper.make_node("Mul", ["p_fault", "inv_pref"], ["score"]),
        ]
        probs = helper.make_tensor_value_info("class_probs", TensorProto.FLOAT, ["batch", k])
        return score_graph(nodes, name, f, inits, [probs])


def _net(torch: Any, height: int, k: int) -> Any:
    c1, c2, c3 = CHANNELS
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        _MeanOverTime(torch),
        nn.Flatten(),
        nn.Linear(c3 * (height // 4), k),
    )


def _MeanOverTime(torch: Any) -> Any:  # noqa: N802 (a module factory, read like a class)
    class MeanOverTime(torch.nn.Module):  # type: ignore[misc,name-defined,unused-ignore]
        def forward(self, x: Any) -> Any:
            return x.mean(dim=3)

    return MeanOverTime()


def fit_cnn(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    classes: tuple[str, ...],
    height: int,
    width: int,
    *,
    epochs: int = 30,
    seed: int = 0,
    lr: float = 3e-3,
    batch: int = 256,
    healthy_weight: float = 1.0,
) -> tuple[CnnModel, Any]:
    """Train on images ``x`` [W, height·width] with class indices ``y`` [W] (0 = healthy),
    classes weighted by their inverse frequency (healthy: times ``healthy_weight``, which
    trades sensitivity for fewer false alarms); deterministic per ``seed`` on the CPU.
    Returns the model (``p_ref`` 1.0; the caller calibrates it) and a function mapping
    images to (1 − P(healthy), class probabilities) with the trained torch network, the
    reference the golden outputs are made with."""
    try:
        import torch
    except ImportError:
        raise ApplianceError(
            "the CNN needs PyTorch: pip install 'cnc-edge-appliance[train]'"
        ) from None
    if height % 4:
        raise ValueError(f"image height {height} must be a multiple of 4")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 for a net this small, and on a busy machine
    try:
        return _fit(torch, x, y, classes, height, width, epochs, seed, lr, batch, healthy_weight)
    finally:
        torch.set_num_threads(threads)


def _fit(
    torch: Any,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    classes: tuple[str, ...],
    height: int,
    width: int,
    epochs: int,
    seed: int,
    lr: float,
    batch: int,
    healthy_weight: float,
) -> tuple[CnnModel, Any]:
    torch.manual_seed(seed)
    k = len(classes)
    xt = torch.tensor(np.asarray(x, np.float32)).reshape(-1, 1, height, width)
    yt = torch.tensor(np.asarray(y, np.int64))
    counts = torch.bincount(yt, minlength=k).clamp(min=1).float()
    weight = counts.sum() / (k * counts)
    weight[0] *= healthy_weight
    net = _net(torch, height, k)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    gen = torch.Generator().manual_seed(seed)
    n = xt.shape[0]
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    fc = [m for m in net if isinstance(m, torch.nn.Linear)][0]

    def reference(images: npt.ArrayLike) -> tuple[F64, F64]:
        with torch.no_grad():
            t = torch.tensor(np.asarray(images, np.float32)).reshape(-1, 1, height, width)
            p = torch.softmax(net(t), dim=1)
            probs = p.numpy().astype(np.float64)
            return p[:, 1:].sum(dim=1).numpy().astype(np.float64), probs

    model = CnnModel(
        height,
        width,
        classes,
        tuple(m.weight.detach().numpy().copy() for m in convs),
        tuple(m.bias.detach().numpy().copy() for m in convs),
        fc.weight.detach().numpy().copy(),
        fc.bias.detach().numpy().copy(),
        1.0,
    )
    return model, reference
