"""The native engine: the spec run by a recurrence kernel of our own (``recurrence.c``, built
with the package and loaded through ctypes, so calls run without the GIL).

Per recurrent layer and direction, every step of a sequence goes through the input kernel in
one matrix product, then the recurrence runs step by step over the rows still inside their
length (longest first, so they are a prefix), the backward direction from each sequence's own
last step: a right-padded batch gives every sequence its own numbers, and padded steps hold
zeros. Weights are packed once for the kernel at start-up. With ``threads=2`` a call that runs
alone runs the two directions of each layer side by side (a lone request on two cores); calls
that overlap others take one thread each, as the service's side-by-side calls are meant to.
A short call after the engine rested (before it, or on average over its last calls) runs on
one thread too: on a virtual machine whose cores sat idle, waking the second thread can
stall the caller for longer than such a call takes alone; the longer the call, the longer
the rest it takes (docs/benchmark.md, "Sporadic requests").

Scratch (the projected inputs and the layers' outputs but the last) is kept per calling
thread and reused, so calls cost no fresh mappings (with glibc told to map large blocks
apart, each fresh one costs a page fault per 4 KiB and a shootdown when freed); after a call
of over ``kept_tokens`` padded tokens it is let go. The service keeps up to
``MAX_BATCH_TOKENS``, what its memory reserves for each engine thread's calls.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from app.errors import ModelError
from app.spec import DenseLayer, GRUVariant, ModelSpec, RecurrentLayer, TokenInput

# The C kernel's enums, in their order.
ACTIVATIONS = {name: code for code, name in enumerate(
    ("linear", "sigmoid", "hard_sigmoid", "tanh", "relu", "softsign", "softplus", "elu"))}
GRU_RESET_AFTER, GRU_RESET_BEFORE, LSTM = 0, 1, 2
_FloatPair = ctypes.c_void_p * 2
# A call of fewer padded tokens runs on one thread when the engine rested, before it or on
# average lately, for longer than COLD_AFTER_S + COLD_AFTER_S_PER_TOKEN per token: a virtual
# machine whose cores rest gets them back sharing one for a while, and then the partner costs
# more than its half of the call saves. The average weighs the last rest by RECENT_WEIGHT and
# counts none past LONG_REST_S (any rest that long is long).
COLD_TOKENS = 256
COLD_AFTER_S = 0.001
COLD_AFTER_S_PER_TOKEN = 35e-6
RECENT_WEIGHT = 0.25
LONG_REST_S = 0.02
_Kept = TypeVar("_Kept")


class _LayerArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in (
        "cell", "f", "g", "units", "inputs", "batch", "steps", "directions", "threads")] + [
        ("lengths", ctypes.c_void_p), ("x", ctypes.c_void_p),
        ("kernel", _FloatPair), ("input_bias", _FloatPair), ("recurrent", _FloatPair),
        ("recurrent_h", _FloatPair), ("recurrent_bias", _FloatPair),
        ("out", ctypes.c_void_p), ("work", ctypes.c_void_p)]


def _library() -> ctypes.CDLL:
    """The kernel built beside this module (``pip install`` compiles it)."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_recurrence{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            break
    else:
        raise ImportError("the native kernel is not built (reinstall the package with a C compiler)",
                          name="app.engine._recurrence")
    pointer, size = ctypes.c_void_p, ctypes.c_int
    lib.recurrent_layer.argtypes = [ctypes.POINTER(_LayerArgs)]
    lib.layer_work_floats.argtypes = [ctypes.POINTER(_LayerArgs)]
    lib.layer_work_floats.restype = ctypes.c_int64
    lib.packed_floats.argtypes = [size, size]
    lib.packed_floats.restype = ctypes.c_int64
    lib.pack_columns.argtypes = [pointer, size, size, pointer]
    lib.matmul.argtypes = [pointer, size, pointer, size, size, pointer, pointer]
    lib.recurrent_layer.restype = ctypes.c_int
    lib.pack_columns.restype = lib.matmul.restype = None
    return lib


class _Packed:
    """A ``(k, n)`` matrix packed for the kernel, kept alive with its address."""

    def __init__(self, lib: ctypes.CDLL, matrix: np.ndarray) -> None:
        source = np.ascontiguousarray(matrix, np.float32)
        self.k, self.n = source.shape
        self.array = aligned_floats(lib.packed_floats(self.k, self.n))
        lib.pack_columns(source.ctypes.data, self.k, self.n, self.array.ctypes.data)
        self.address = self.array.ctypes.data


def call_threads(threads: int, others: int, tokens: int, idle_s: float) -> int:
    """Threads for a call of ``tokens`` padded tokens: one beside ``others`` calls in flight,
    and for a short call after the engine sat idle ``idle_s`` (the shorter the call, the
    sooner); else ``threads``."""
    cold = tokens < COLD_TOKENS and idle_s > COLD_AFTER_S + tokens * COLD_AFTER_S_PER_TOKEN
    return 1 if others or cold else threads


class Rests:
    """How long the engine sat idle before its calls: the last rest, and their running average."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since = clock()  # when the last call in flight ended
        self.average = 0.0

    def resting(self) -> None:
        """The last call in flight has ended."""
        self.since = self.clock()

    def ended(self) -> float:
        """The rest up to now, taken into the average; the longer of it and the average."""
        rest = self.clock() - self.since
        self.average += RECENT_WEIGHT * (min(rest, LONG_REST_S) - self.average)
        return max(rest, self.average)


def aligned_floats(count: int) -> np.ndarray:
    """``count`` float32 starting on a cache line (NumPy's start 16 bytes in): an unaligned
    64-byte load reads two lines, which halves what the kernel gets from L2."""
    spare = np.empty(count + 16, np.float32)
    skip = (-spare.ctypes.data % 64) // 4
    return spare[skip: skip + count]


def _floats(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.ascontiguousarray(array, np.float32)


class _Layer:
    """One recurrent layer's packed weights and the fixed part of its kernel arguments (each
    call fills a copy)."""

    def __init__(self, lib: ctypes.CDLL, layer: RecurrentLayer) -> None:
        variant, units = layer.variant, layer.units
        if isinstance(variant, GRUVariant):
            cell = GRU_RESET_AFTER if variant.reset_after else GRU_RESET_BEFORE
        else:
            cell = LSTM
        self.layer, self.units = layer, units
        self._keep: list[object] = []
        args = self.args = _LayerArgs(
            cell=cell, f=ACTIVATIONS[variant.recurrent_activation], g=ACTIVATIONS[variant.activation],
            units=units, inputs=layer.forward.input_width, directions=len(layer.directions()),
            threads=1)
        for d, weights in enumerate(layer.directions()):
            bias = np.atleast_2d(_floats(weights.bias))
            recurrent = weights.recurrent_kernel
            if cell == GRU_RESET_BEFORE:
                args.recurrent_h[d] = self._kept(_Packed(lib, recurrent[:, 2 * units:])).address
                recurrent = recurrent[:, : 2 * units]
            args.kernel[d] = self._kept(_Packed(lib, weights.kernel)).address
            args.recurrent[d] = self._kept(_Packed(lib, recurrent)).address
            args.input_bias[d] = self._kept(_floats(bias[0])).ctypes.data
            if cell != LSTM:  # a GRU's second bias row adds to the recurrent product
                args.recurrent_bias[d] = self._kept(_floats(bias[1])).ctypes.data

    def _kept(self, value: _Kept) -> _Kept:
        """``value`` held as long as the layer, since the kernel has its address."""
        self._keep.append(value)
        return value


class NativeEngine:
    name = "native"
    parallel_calls = True
    ragged = True

    def __init__(self, spec: ModelSpec, threads: int = 1, kept_tokens: int = 2048) -> None:
        self._lib = _library()
        self._kept_tokens = kept_tokens
        self.input = spec.input
        self._embeddings = (np.ascontiguousarray(spec.input.embeddings, np.float32)
                            if isinstance(spec.input, TokenInput) else None)
        self._layers = [_Layer(self._lib, layer) for layer in spec.layers]
        self._threads = min(threads, 2)
        self._calls = 0  # calls in flight, under _lock
        self._rests = Rests()  # under _lock
        self._lock = threading.Lock()
        self._dense = [(dense, _Packed(self._lib, dense.kernel), _floats(dense.bias))
                       for dense in spec.dense]
        self._scratch = threading.local()

    def run(self, inputs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self._calls += 1
            idle_s = self._rests.ended() if self._calls == 1 else 0.0
            threads = call_threads(self._threads, self._calls - 1, inputs.shape[0] * inputs.shape[1], idle_s)
        try:
            return self._run(inputs, np.ascontiguousarray(lengths, np.int32), threads)
        finally:
            with self._lock:
                self._calls -= 1
                if self._calls == 0:
                    self._rests.resting()

    def _run(self, inputs: np.ndarray, lengths: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
        batch, steps = inputs.shape[:2]
        if self._embeddings is not None:
            width = self._embeddings.shape[1]
            x = self._buffer("embedded", batch * steps * width).reshape(batch, steps, width)
            np.take(self._embeddings, inputs, axis=0, out=x)
        else:
            x = np.ascontiguousarray(inputs, np.float32)
        last = len(self._layers) - 1
        for index, layer in enumerate(self._layers):
            x = self._recurrent(layer, x, lengths, (batch, steps, threads), index, last=index == last)
        hidden = x
        for dense, kernel, bias in self._dense:
            x = self._dense_layer(dense, kernel, bias, x)
        if batch * steps > self._kept_tokens:
            self._scratch.__dict__.clear()
        return x, hidden

    def _recurrent(self, layer: _Layer, x: np.ndarray, lengths: np.ndarray,
                   shape: tuple[int, int, int], index: int, last: bool) -> np.ndarray:
        batch, steps, threads = shape
        args = _LayerArgs.from_buffer_copy(layer.args)  # calls run side by side: one each
        args.batch, args.steps, args.threads = batch, steps, threads
        args.lengths, args.x = lengths.ctypes.data, x.ctypes.data
        width = args.directions * layer.units
        merged = layer.layer.merge_mode != "concat" and args.directions == 2
        out = (np.empty((batch, steps, width), np.float32) if last and not merged
               else self._buffer(f"out{index % 2}", batch * steps * width).reshape(batch, steps, width))
        args.out = out.ctypes.data
        args.work = self._buffer("work", self._lib.layer_work_floats(ctypes.byref(args))).ctypes.data
        self._lib.recurrent_layer(ctypes.byref(args))
        if merged:  # the layer's two directions merged as Keras' Bidirectional does
            forward, backward = out[..., : layer.units], out[..., layer.units:]
            mode = layer.layer.merge_mode
            out = (forward + backward if mode == "sum" else forward * backward if mode == "mul"
                   else (forward + backward) / np.float32(2))
        return out

    def _buffer(self, role: str, floats: int) -> np.ndarray:
        """Scratch of this thread for ``role``, grown as needed and reused."""
        kept = getattr(self._scratch, role, None)
        if kept is None or kept.size < floats:
            kept = aligned_floats(floats)
            setattr(self._scratch, role, kept)
        return kept[:floats]

    def _dense_layer(self, dense: DenseLayer, kernel: _Packed, bias: np.ndarray | None,
                     x: np.ndarray) -> np.ndarray:
        rows = x.shape[0] * x.shape[1]
        y = np.empty((*x.shape[:2], kernel.n), np.float32)
        source = np.ascontiguousarray(x)
        self._lib.matmul(source.ctypes.data, rows, kernel.address, kernel.k, kernel.n,
                         None if bias is None else bias.ctypes.data, y.ctypes.data)
        return _dense_activation(dense.activation, y)

    def pad_shape(self, batch: int, steps: int) -> tuple[int, int]:
        return batch, steps

    def warm_shapes(self, max_batch: int, max_len: int) -> list[tuple[int, int]]:
        return [(1, 16), (max_batch, 64)]


def _dense_activation(name: str, y: np.ndarray) -> np.ndarray:
    if name == "softmax":
        y = np.exp(y - y.max(axis=-1, keepdims=True))
        return y / y.sum(axis=-1, keepdims=True)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-y))
    if name == "tanh":
        return np.tanh(y)
    if name == "relu":
        return np.maximum(y, 0)
    if name != "linear":
        raise ModelError(f"the native engine has no dense activation {name!r}")
    return y
