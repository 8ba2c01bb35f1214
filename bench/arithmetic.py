"""The work a model's tokens cost, and what this machine's cores can do: each engine's speed
as GFLOP/s beside the peak (issue: know where the floor is).

- :func:`flops_per_token`: multiply-adds count two; per recurrent layer and direction, the
  input and the recurrent products ``2 (I + U) x gates U`` per step; each dense layer
  ``2 x in x out``. The activations and the cell's element-wise work are left out (a few
  percent).
- :func:`peak_gflops`: one core's FMA peak, from twelve independent chains of 8-float FMAs
  (``bench/peak.c``, built with ``-march=native``), so it reads AVX2's or AVX-512's as the
  CPU has them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from app.spec import ModelSpec

SOURCE = Path(__file__).with_name("peak.c")


def flops_per_token(spec: ModelSpec) -> int:
    flops = 0
    for layer in spec.layers:
        gates = layer.variant.gates * layer.units
        flops += len(layer.directions()) * 2 * (layer.forward.input_width + layer.units) * gates
    return flops + sum(2 * dense.kernel.shape[0] * dense.kernel.shape[1] for dense in spec.dense)


def peak_gflops() -> float | None:
    """One core's single-precision FMA peak, measured; None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "peak"
        subprocess.run([compiler, "-O2", "-march=native", str(SOURCE), "-o", str(binary)], check=True)
        runs = [float(subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout)
                for _ in range(3)]
    return max(runs)
