"""Exact mappings from each LSTM weight layout to the Keras 3 layout of :mod:`app.spec`.

The derivations are in ``docs/cudnn-lstm-formats.md``. ``U`` is units, ``I`` the input
width, ``blk(A, g)`` the columns ``g*U:(g+1)*U`` of ``A``. The target's gate blocks are
i, f, c, o and its one bias row is the sum of cuDNN's two: both add outside every product
(``z = W x + bW + R h + bR``), so the sum is exact, unlike a GRU's candidate bias.
"""

from __future__ import annotations

import numpy as np

from app.errors import ModelError
from app.formats.layouts import CellRead, check_shape, float32, torch_biases
from app.spec import LSTMWeights

GATES = 4
TF1_TO_KERAS = (0, 2, 1, 3)  # TF's own cells' i, c, f, o blocks taken as i, f, c, o


def _units_of(recurrent_kernel: np.ndarray, where: str) -> int:
    if recurrent_kernel.ndim != 2 or recurrent_kernel.shape[1] != GATES * recurrent_kernel.shape[0]:
        raise ModelError(f"{where}: recurrent_kernel has shape {recurrent_kernel.shape}, expected (U, 4U)")
    return int(recurrent_kernel.shape[0])


def _kernel_width(kernel: np.ndarray, units: int, where: str) -> int:
    if kernel.ndim != 2 or kernel.shape[1] != GATES * units:
        raise ModelError(f"{where}: kernel has shape {kernel.shape}, expected (I, {GATES * units})")
    return int(kernel.shape[0])


def from_cudnn_lstm(kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray,
                    where: str) -> LSTMWeights:
    """Keras 2 / TF 1.x ``CuDNNLSTM``: ``bias (8U,)`` = ``[input i,f,c,o | recurrent i,f,c,o]``.

    As for ``CuDNNGRU``, each ``(I, U)`` kernel block is handed to cuDNN as raw bytes and
    read as a row-major ``(U, I)`` matrix ``W``; Keras wants ``W.T``, so each input block is
    reshaped to ``(U, I)`` and then transposed (a plain transpose is right only when
    ``I == U``). Recurrent blocks are square and just transposed. Gate order is cuDNN's
    i, f, c, o on both sides.
    """
    units = _units_of(recurrent_kernel, where)
    width = _kernel_width(kernel, units, where)
    check_shape(bias, (2 * GATES * units,), "bias", where)

    def block(matrix: np.ndarray, gate: int) -> np.ndarray:
        return matrix[:, gate * units : (gate + 1) * units]

    return LSTMWeights(
        kernel=float32(np.hstack([block(kernel, g).reshape(units, width).T for g in range(GATES)])),
        recurrent_kernel=float32(np.hstack([block(recurrent_kernel, g).T for g in range(GATES)])),
        bias=float32(bias[: GATES * units].astype(np.float64) + bias[GATES * units :]),
    )


def from_keras_lstm(kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray,
                    where: str) -> LSTMWeights:
    """tf.keras / Keras 3 ``LSTM``: already the target layout."""
    units = _units_of(recurrent_kernel, where)
    _kernel_width(kernel, units, where)
    check_shape(bias, (GATES * units,), "bias", where)
    return LSTMWeights(float32(kernel), float32(recurrent_kernel), float32(bias))


def from_keras2_lstm_file(kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray,
                          where: str, claims_cudnn: bool | None) -> CellRead:
    """An LSTM read from a Keras 2 file; the bias shape tells the layout: ``(8U,)``
    CuDNNLSTM, ``(4U,)`` LSTM. A ``CuDNNLSTM`` claim must have cuDNN's bias."""
    units = _units_of(recurrent_kernel, where)
    if bias.shape == (2 * GATES * units,):
        return CellRead(from_cudnn_lstm(kernel, recurrent_kernel, bias, where), "cudnn-lstm->keras-lstm",
                        cudnn=True)
    if claims_cudnn:
        raise ModelError(f"{where}: claims CuDNNLSTM but its bias has shape {bias.shape}, "
                         "not cuDNN's (8*units,)")
    return CellRead(from_keras_lstm(kernel, recurrent_kernel, bias, where), "none (Keras LSTM layout)")


def from_torch_lstm(weight_ih: np.ndarray, weight_hh: np.ndarray,
                    bias_ih: np.ndarray | None, bias_hh: np.ndarray | None, where: str) -> LSTMWeights:
    """PyTorch ``nn.LSTM``: ``weight_ih (4U, I)`` with row blocks i, f, g, o (g is Keras' c),
    the order Keras uses; ``kernel = weight_ih.T`` and ``bias = bias_ih + bias_hh``."""
    bias_ih, bias_hh = torch_biases(weight_ih, weight_hh, bias_ih, bias_hh, GATES, where)
    return LSTMWeights(float32(weight_ih.T), float32(weight_hh.T),
                       float32(bias_ih.astype(np.float64) + bias_hh))


def from_tf1_canonical_lstm(kernel: np.ndarray, bias: np.ndarray, where: str) -> LSTMWeights:
    """TF 1.x ``CudnnLSTM`` checkpoint, canonical ``cudnn_compatible_lstm_cell`` names.

    ``kernel (I+U, 4U)``: rows ``:I`` act on x, the rest on h; ``bias (4U,)`` the sum of
    cuDNN's two. Both are in the order of TF's own LSTM cells, i, c, f, o (TF's saver swaps
    cuDNN's canonical i, f, c, o into it), so blocks 1 and 2 swap back. The cell adds no
    forget bias (``CudnnCompatibleLSTMCell`` sets ``forget_bias=0``).
    """
    if kernel.ndim != 2 or kernel.shape[1] % GATES or kernel.shape[0] <= kernel.shape[1] // GATES:
        raise ModelError(f"{where}: kernel has shape {kernel.shape}, expected (I+U, 4U)")
    units = kernel.shape[1] // GATES
    width = kernel.shape[0] - units
    check_shape(bias, (GATES * units,), "bias", where)

    def keras_order(array: np.ndarray) -> np.ndarray:
        blocks = np.split(array, GATES, axis=-1)
        return np.concatenate([blocks[g] for g in TF1_TO_KERAS], axis=-1)

    return LSTMWeights(float32(keras_order(kernel[:width])), float32(keras_order(kernel[width:])),
                       float32(keras_order(bias)))
