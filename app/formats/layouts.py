"""What every weight-layout reader returns, and the checks they share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.errors import ModelError
from app.spec import CellWeights, LSTMWeights

GATES = {"GRU": 3, "LSTM": 4}


@dataclass(frozen=True)
class CellRead:
    """One direction of a recurrent layer as read from a file: its weights (a GRU's or an
    LSTM's), the conversion applied, and what its layout tells: ``reset_after`` (a GRU's), and
    ``cudnn`` when the layout is a cuDNN-trained layer's (CuDNNGRU / CuDNNLSTM, PyTorch, TF
    1.x CudnnGRU / CudnnLSTM), which always runs cuDNN's equations."""

    weights: CellWeights
    conversion: str
    reset_after: bool = True
    cudnn: bool = False

    @property
    def cell(self) -> str:
        return "LSTM" if isinstance(self.weights, LSTMWeights) else "GRU"


def float32(array: np.ndarray) -> np.ndarray:
    """Contiguous float32, the one dtype the spec holds."""
    return np.ascontiguousarray(array, dtype=np.float32)


def check_shape(array: np.ndarray, shape: tuple[int, ...], what: str, where: str) -> None:
    if array.shape != shape:
        raise ModelError(f"{where}: {what} has shape {array.shape}, expected {shape}")


def cell_of(recurrent_kernel: np.ndarray, where: str) -> str:
    """A Keras ``recurrent_kernel``'s cell: ``(U, 3U)`` a GRU's, ``(U, 4U)`` an LSTM's."""
    if recurrent_kernel.ndim == 2:
        for cell, gates in GATES.items():
            if recurrent_kernel.shape[1] == gates * recurrent_kernel.shape[0]:
                return cell
    raise ModelError(f"{where}: recurrent_kernel has shape {recurrent_kernel.shape}, expected "
                     "(U, 3U) (a GRU) or (U, 4U) (an LSTM)")


def torch_biases(weight_ih: np.ndarray, weight_hh: np.ndarray, bias_ih: np.ndarray | None,
                 bias_hh: np.ndarray | None, gates: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check a PyTorch RNN's ``weight_ih (gates*U, I)`` and ``weight_hh (gates*U, U)``; its two
    biases, zeros where the module has none (``bias=False``)."""
    if weight_hh.ndim != 2 or weight_hh.shape[0] != gates * weight_hh.shape[1]:
        raise ModelError(f"{where}: weight_hh has shape {weight_hh.shape}, expected ({gates}U, U)")
    rows = gates * int(weight_hh.shape[1])
    if weight_ih.ndim != 2 or weight_ih.shape[0] != rows:
        raise ModelError(f"{where}: weight_ih has shape {weight_ih.shape}, expected ({gates}U, I)")
    zeros = np.zeros(rows, np.float32)
    bias_ih = zeros if bias_ih is None else bias_ih
    bias_hh = zeros if bias_hh is None else bias_hh
    check_shape(bias_ih, (rows,), "bias_ih", where)
    check_shape(bias_hh, (rows,), "bias_hh", where)
    return bias_ih, bias_hh
