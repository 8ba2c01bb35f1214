"""The native kernel's matrix product at the default model's shapes, against the FMA peak:
``python -m bench.kernel``.

One row by the recurrent kernel (128 x 384) is a lone sequence's step: it streams the
kernel's 192 KiB from L2 once per step, so it is bound by L2's bandwidth, not by the FMA
units; more rows reuse each loaded block (the batched steps and the input projections run
near the peak). Times are per product, less the cost of an empty ctypes call, over the
calling thread's CPU time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np

from app.engine.native_engine import _library, _Packed, aligned_floats
from bench.arithmetic import peak_gflops

SHAPES = ((1, 128, 384), (6, 128, 384), (32, 128, 384), (64, 256, 384), (2048, 256, 384))


def per_call_s(call: Callable[[], object], repeats: int) -> float:
    start = time.thread_time()
    for _ in range(repeats):
        call()
    return (time.thread_time() - start) / repeats


def main() -> None:
    lib, rng = _library(), np.random.default_rng(0)
    empty = per_call_s(lambda: lib.matmul(None, 0, None, 0, 0, None, None), 100_000)
    peak = peak_gflops()
    print(f"FMA peak, one core: {peak:.1f} GFLOP/s" if peak else "FMA peak: no C compiler")
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        packed, c = _Packed(lib, rng.standard_normal((k, n)).astype(np.float32)), aligned_floats(m * n)
        repeats = max(20, int(2e9 / (2 * m * k * n)))
        call = partial(lib.matmul, a.ctypes.data, m, packed.address, k, n, None, c.ctypes.data)
        seconds = per_call_s(call, repeats) - empty
        gflops, bandwidth = 2 * m * k * n / seconds / 1e9, 4 * k * n / seconds / 1e9
        print(f"{m:5d} x {k} @ {k} x {n}: {seconds * 1e6:9.2f} us, {gflops:6.1f} GFLOP/s, "
              f"weights read at {bandwidth:6.1f} GB/s")


if __name__ == "__main__":
    main()
