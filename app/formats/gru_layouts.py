"""Exact mappings from each GRU weight layout to the Keras 3 layout of :mod:`app.spec`.

The derivations, and the numeric checks behind them, are in ``docs/cudnn-gru-formats.md``.
``U`` is units, ``I`` the input width, ``blk(A, g)`` the columns ``g*U:(g+1)*U`` of ``A``.
"""

from __future__ import annotations

import numpy as np

from app.errors import ModelError
from app.formats.layouts import CellRead, float32, torch_biases
from app.formats.layouts import check_shape as _check
from app.spec import GRUWeights

GATES = 3


def _units_of(recurrent_kernel: np.ndarray, where: str) -> int:
    if recurrent_kernel.ndim != 2 or recurrent_kernel.shape[1] != GATES * recurrent_kernel.shape[0]:
        raise ModelError(
            f"{where}: recurrent_kernel has shape {recurrent_kernel.shape}, expected (U, 3U)"
        )
    return int(recurrent_kernel.shape[0])


def from_cudnn_gru(
    kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray, where: str
) -> GRUWeights:
    """Keras 2 / TF 1.x ``CuDNNGRU``: ``bias (6U,)``, kernels as cuDNN reads them.

    The layer hands each ``(I, U)`` kernel block to cuDNN as raw bytes, which cuDNN reads
    as a row-major ``(U, I)`` matrix ``W``. Keras wants ``W.T``, so each input block is
    *reshaped* to ``(U, I)`` and then transposed: a plain transpose is only right when
    ``I == U``. Recurrent blocks are square and just transposed. Gate order (z, r, h) is
    the same on both sides, and the bias is ``[input z,r,h | recurrent z,r,h]``.
    """
    units = _units_of(recurrent_kernel, where)
    if kernel.ndim != 2 or kernel.shape[1] != GATES * units:
        raise ModelError(f"{where}: kernel has shape {kernel.shape}, expected (I, {GATES * units})")
    _check(bias, (2 * GATES * units,), "bias", where)
    width = kernel.shape[0]

    def block(matrix: np.ndarray, gate: int) -> np.ndarray:
        return matrix[:, gate * units : (gate + 1) * units]

    return GRUWeights(
        kernel=float32(np.hstack([block(kernel, g).reshape(units, width).T for g in range(GATES)])),
        recurrent_kernel=float32(np.hstack([block(recurrent_kernel, g).T for g in range(GATES)])),
        bias=float32(bias.reshape(2, GATES * units)),
    )


def from_keras_gru(
    kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray, where: str
) -> tuple[GRUWeights, bool]:
    """tf.keras / Keras 3 ``GRU``: already the target layout. Returns the weights and
    ``reset_after``, which the bias shape tells: ``(2, 3U)`` True, ``(3U,)`` False (that one
    row becomes row 0 and row 1 is zeros, see :mod:`app.spec`)."""
    units = _units_of(recurrent_kernel, where)
    if bias.shape == (GATES * units,):
        bias = np.stack([bias, np.zeros_like(bias)])
        reset_after = False
    else:
        _check(bias, (2, GATES * units), "bias", where)
        reset_after = True
    return GRUWeights(float32(kernel), float32(recurrent_kernel), float32(bias)), reset_after


def from_keras2_file(
    kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray, where: str
) -> CellRead:
    """A GRU read from a Keras 2 file; the bias shape is the only reliable tell of the layout:
    ``(6U,)`` CuDNNGRU, ``(2, 3U)`` GRU(reset_after=True), ``(3U,)`` GRU(reset_after=False)."""
    units = _units_of(recurrent_kernel, where)
    if bias.shape == (2 * GATES * units,):
        return CellRead(from_cudnn_gru(kernel, recurrent_kernel, bias, where), "cudnn-gru->keras-gru",
                       cudnn=True)
    weights, reset_after = from_keras_gru(kernel, recurrent_kernel, bias, where)
    return CellRead(weights, "none (Keras GRU layout)", reset_after)


def from_torch_gru(
    weight_ih: np.ndarray, weight_hh: np.ndarray,
    bias_ih: np.ndarray | None, bias_hh: np.ndarray | None, where: str,
) -> GRUWeights:
    """PyTorch ``nn.GRU``: ``weight_ih (3U, I)`` with row blocks r, z, n (n is Keras' h)."""
    bias_ih, bias_hh = torch_biases(weight_ih, weight_hh, bias_ih, bias_hh, GATES, where)

    def zrn(rows: np.ndarray) -> list[np.ndarray]:
        r, z, n = np.split(rows, GATES)
        return [z, r, n]

    return GRUWeights(
        kernel=float32(np.hstack([w.T for w in zrn(weight_ih)])),
        recurrent_kernel=float32(np.hstack([w.T for w in zrn(weight_hh)])),
        bias=float32(np.stack([np.concatenate(zrn(bias_ih)), np.concatenate(zrn(bias_hh))])),
    )


def from_tf1_canonical(
    gates_kernel: np.ndarray, gates_bias: np.ndarray,
    input_kernel: np.ndarray, input_bias: np.ndarray,
    hidden_kernel: np.ndarray, hidden_bias: np.ndarray, where: str,
) -> GRUWeights:
    """TF 1.x ``CudnnGRU`` checkpoint, canonical ``cudnn_compatible_gru_cell`` names.

    ``gates/kernel (I+U, 2U)``: rows ``:I`` act on x, the rest on h; columns ``:U`` are r,
    ``U:`` are z. Only the sum of the input and recurrent gate biases is stored, and only
    the sum matters, so it goes in the input row and the recurrent row holds zeros there.
    """
    units = int(hidden_kernel.shape[0]) if hidden_kernel.ndim == 2 else -1
    _check(hidden_kernel, (units, units), "candidate/hidden_projection/kernel", where)
    width = gates_kernel.shape[0] - units
    _check(gates_kernel, (width + units, 2 * units), "gates/kernel", where)
    _check(gates_bias, (2 * units,), "gates/bias", where)
    _check(input_kernel, (width, units), "candidate/input_projection/kernel", where)
    _check(input_bias, (units,), "candidate/input_projection/bias", where)
    _check(hidden_bias, (units,), "candidate/hidden_projection/bias", where)
    on_x, on_h = gates_kernel[:width], gates_kernel[width:]
    zeros = np.zeros(units, np.float32)
    return GRUWeights(
        kernel=float32(np.hstack([on_x[:, units:], on_x[:, :units], input_kernel])),
        recurrent_kernel=float32(np.hstack([on_h[:, units:], on_h[:, :units], hidden_kernel])),
        bias=float32(np.stack([
            np.concatenate([gates_bias[units:], gates_bias[:units], input_bias]),
            np.concatenate([zeros, zeros, hidden_bias]),
        ])),
    )
