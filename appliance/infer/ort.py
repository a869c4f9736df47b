"""onnxruntime backend (CPU, or CUDA when onnxruntime-gpu is installed and a GPU is present)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.errors import ModelError
from appliance.infer.base import Engine
from appliance.infer.bundle import ModelBundle


class OrtEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self, bundle: ModelBundle, *, providers: list[str], threads: int = 1, max_batch: int = 4096
    ) -> None:
        super().__init__(bundle, max_batch=max_batch)
        self.providers = providers
        self.threads = threads
        self._session: Any = None

    def _start_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.bundle.onnx_path), sess_options=opts, providers=self.providers
            )
        except Exception as err:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise ModelError(f"onnxruntime cannot load {self.bundle.onnx_path}: {err}") from None
        names_in = [i.name for i in self._session.get_inputs()]
        names_out = [o.name for o in self._session.get_outputs()]
        if self.bundle.input_name not in names_in or self.bundle.output_name not in names_out:
            raise ModelError(
                f"{self.bundle.onnx_path}: graph I/O {names_in}→{names_out} does not match the "
                f"manifest's {self.bundle.input_name}→{self.bundle.output_name}"
            )
        self.detail = ",".join(self._session.get_providers())

    def _infer_impl(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = self._session.run([self.bundle.output_name], {self.bundle.input_name: batch})
        return np.asarray(out[0], dtype=np.float32)

    def _close_impl(self) -> None:
        self._session = None
