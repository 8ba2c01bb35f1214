"""The OpenVINO engine: the ONNX graph of :mod:`app.lowering.onnx_graph`, lowered with
``backward="reversed"`` so that every ``GRU`` / ``LSTM`` is a forward one without ``sequence_lens``,
which OpenVINO's CPU plugin runs as one fused oneDNN RNN per direction (given
``sequence_lens``, it unrolls the loop step by step and mixes padding into the backward
direction of shorter sequences).

Compiled once for dynamic shapes (no per-shape compilation on the request path), in
``f32``: on CPUs with bfloat16 units OpenVINO would otherwise compute in bfloat16 and
miss the GPU outputs by ~1e-2. An infer request is not thread-safe, so each engine thread
gets its own.

Only cuDNN's cells (GRU ``reset_after=True``, LSTM; sigmoid and tanh) are lowered to
OpenVINO: its CPU plugin refuses most of the other activations Keras 2 layers carry (elu,
softsign, ...), so a model with another variant is refused here and ``ENGINE=auto`` serves
it with ONNX Runtime.
"""

from __future__ import annotations

import threading

import numpy as np

from app.errors import ModelError
from app.spec import ModelSpec


class OpenVinoEngine:
    name = "openvino"
    parallel_calls = True
    ragged = False

    def __init__(self, spec: ModelSpec, threads: int = 1, streams: int = 1) -> None:
        import openvino

        from app.lowering.onnx_graph import build_onnx_model

        others = [f"{layer.name} ({layer.variant})" for layer in spec.layers if not layer.variant.is_cudnn]
        if others:
            raise ModelError(f"the openvino engine runs cuDNN's GRU and LSTM only, not {', '.join(others)}")
        self.input = spec.input
        core = openvino.Core()
        model = core.read_model(build_onnx_model(spec, backward="reversed").SerializeToString())
        self._compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": streams,
            "INFERENCE_NUM_THREADS": threads * streams,
            "ENABLE_CPU_PINNING": False,  # pinned threads would fight the event loop's core
        })
        self._requests = threading.local()

    def run(self, inputs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._compiled.create_infer_request()
        results = request.infer({self.input.name: inputs, "lengths": lengths.astype(np.int32)})
        outputs, hidden = (results[self._compiled.output(name)] for name in ("outputs", "hidden"))
        return outputs, hidden

    def pad_shape(self, batch: int, steps: int) -> tuple[int, int]:
        return batch, steps

    def warm_shapes(self, max_batch: int, max_len: int) -> list[tuple[int, int]]:
        return [(1, 16), (max_batch, 64), (1, max_len)]
