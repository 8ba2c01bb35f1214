"""Engines run one right-padded batch: the model's input (``ids (B, T) int32`` or
``features (B, T, F) float32``, as ``engine.input`` says, the spec's input) and ``lengths
(B,)`` in, ``outputs (B, T, C)`` and ``hidden (B, T, H)`` out. Rows past a sequence's length
are padding and are ignored by the caller; each sequence's own rows are exact.

- :class:`~app.engine.native_engine.NativeEngine` runs the spec through a recurrence kernel of
  our own (C, built with the package); ``ENGINE=auto`` times it against the others.
- :class:`OnnxRuntimeEngine` runs the graph of :mod:`app.lowering.onnx_graph`. No per-shape
  compilation, so there is nothing to warm per length.
- :class:`~app.engine.openvino_engine.OpenVinoEngine` runs the same graph in OpenVINO
  (optional package); ``ENGINE=auto`` times it against ONNX Runtime at start-up.
- :class:`KerasEngine` runs the model of :mod:`app.lowering.keras_model`, XLA-compiled once
  per padded shape ``(batch bucket, length bucket)``: the reference engine.

The ONNX Runtime session is thread-safe and runs best as several one-thread calls side by
side (``parallel_calls``); the Keras engine runs one call at a time on all its threads.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from app.engine.buckets import bucket_of
from app.spec import ModelInput, ModelSpec


class Engine(Protocol):
    name: str
    parallel_calls: bool
    # Whether run() computes each sequence over its own steps only, padding costing it nothing
    # but memory: the runner then puts any lengths in one call rather than one per length bucket.
    ragged: bool
    input: ModelInput  # what run() takes: its name, dtype and per-step shape

    def run(self, inputs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def pad_shape(self, batch: int, steps: int) -> tuple[int, int]:
        """The shape a ``(batch, steps)`` group is padded to before :meth:`run`."""
        ...

    def warm_shapes(self, max_batch: int, max_len: int) -> list[tuple[int, int]]:
        """Shapes to run once before the service reports ready."""
        ...


# Padded tokens (batch x steps) a call may leave in ONNX Runtime's arena for the next calls;
# after a larger call the arena gives back what no call is using (docs/memory.md: figures).
ARENA_KEPT_TOKENS = 2048


class OnnxRuntimeEngine:
    name = "onnxruntime"
    parallel_calls = True
    ragged = False

    def __init__(self, spec: ModelSpec, threads: int = 1) -> None:
        import onnxruntime as ort

        from app.lowering.onnx_graph import build_onnx_model

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Threads spin between calls by default: that steals the event loop's core.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The arena reuses its buffers (fresh mappings cost a page fault per 4 KiB of every call);
        # shrunk after calls of over ARENA_KEPT_TOKENS, it keeps only a small call's working set.
        options.enable_cpu_mem_arena = True
        options.enable_mem_pattern = False  # per-shape pattern blocks raise a call's peak
        self.input = spec.input
        self._session = ort.InferenceSession(
            build_onnx_model(spec).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self._keep = ort.RunOptions()
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        widths = {o.name: o.shape[-1] for o in self._session.get_outputs()}
        self._widths = (widths["outputs"], widths["hidden"])

    def run(self, inputs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch, steps = inputs.shape[:2]
        # The results are written into arrays of their own, not the arena's: results still being
        # sent would otherwise pin its regions past the shrinking.
        outputs, hidden = (np.empty((batch, steps, width), np.float32) for width in self._widths)
        # Bound by address: these names keep the arrays alive until the call returns.
        given, steps_of = np.ascontiguousarray(inputs), np.ascontiguousarray(lengths, np.int32)
        binding = self._session.io_binding()
        binding.bind_cpu_input(self.input.name, given)
        binding.bind_cpu_input("lengths", steps_of)
        for name, array in (("outputs", outputs), ("hidden", hidden)):
            binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
        large = batch * steps > ARENA_KEPT_TOKENS
        self._session.run_with_iobinding(binding, self._shrink if large else self._keep)
        return outputs, hidden

    def pad_shape(self, batch: int, steps: int) -> tuple[int, int]:
        return batch, steps

    def warm_shapes(self, max_batch: int, max_len: int) -> list[tuple[int, int]]:
        return [(1, 16), (max_batch, 64), (1, max_len)]


class KerasEngine:
    """XLA-compiled Keras 3; each new padded shape compiles once (about a second)."""

    name = "keras-xla"
    parallel_calls = False
    ragged = False

    def __init__(self, spec: ModelSpec, threads: int, length_buckets: list[int],
                 keras_file: str | None = None) -> None:
        """``keras_file``: serve this saved ``.keras`` model itself (loaded by Keras in safe
        mode) rather than a model built from ``spec``."""
        import tensorflow as tf

        from app.lowering.keras_model import build_keras_model, load_keras_model

        _set_tf_threads(tf, threads)
        self.input = spec.input
        self._buckets = length_buckets
        self._model = load_keras_model(keras_file) if keras_file else build_keras_model(spec)
        self._call = tf.function(lambda inputs, mask: self._model([inputs, mask], training=False),
                                 jit_compile=True, reduce_retracing=False)

    def run(self, inputs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from app.lowering.keras_model import mask_of

        outputs, hidden = self._call(inputs, mask_of(inputs, lengths))
        return outputs.numpy(), hidden.numpy()

    def pad_shape(self, batch: int, steps: int) -> tuple[int, int]:
        return 1 << (batch - 1).bit_length(), bucket_of(self._buckets, steps)

    def warm_shapes(self, max_batch: int, max_len: int) -> list[tuple[int, int]]:
        return [(1, bucket) for bucket in self._buckets if bucket <= max_len]


def _set_tf_threads(tf: object, threads: int) -> None:
    config = tf.config.threading  # type: ignore[attr-defined]
    try:
        config.set_intra_op_parallelism_threads(threads)
        config.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised in this process (tests build several engines)


ENGINE_KINDS = ("native", "onnxruntime", "openvino", "keras")


def make_engine(kind: str, spec: ModelSpec, threads: int | None, length_buckets: list[int],
                keras_file: str | None = None, kept_tokens: int = ARENA_KEPT_TOKENS) -> Engine:
    """The engine named ``kind`` (``auto`` is :func:`app.engine.engine_choice.choose_engine`'s).
    ``keras_file``: the saved Keras model ``spec`` was read from, which ``keras`` serves itself;
    ``kept_tokens``: the largest call (padded tokens) whose scratch the native engine keeps
    for its thread's next calls (the service: ``MAX_BATCH_TOKENS``, which its memory reserves)."""
    if kind == "native":
        from app.engine.native_engine import NativeEngine

        # Two threads run a layer's two directions side by side (a lone request on two cores).
        return NativeEngine(spec, threads or min(2, os.cpu_count() or 1), kept_tokens)
    if kind == "keras":
        return KerasEngine(spec, threads or os.cpu_count() or 1, length_buckets, keras_file)
    if kind == "openvino":
        from app.engine.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(spec, threads or 1)
    return OnnxRuntimeEngine(spec, threads or 1)
