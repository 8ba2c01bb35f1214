"""GPU parity data: sequences and the per-step outputs the GPU gave for them, read from and
written to ``.npz`` files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.errors import ModelError
from app.formats.manifest import Parity


@dataclass(frozen=True)
class ParityData:
    """Sequences and the per-step outputs the GPU gave for them."""

    file: str
    sequences: list[np.ndarray]
    outputs: list[np.ndarray]
    hidden: list[np.ndarray] | None
    tolerance: float | None


def read_parity(directory: Path, parity: Parity) -> ParityData:
    """An ``.npz`` with the concatenated inputs (``ids (N,)`` integers, or ``features (N, F)``
    floats: the array named by ``parity.ids``) and per-step arrays, split by ``lengths``."""
    path = directory / parity.file
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in (parity.ids, parity.lengths, parity.outputs,
                                                  parity.hidden) if key is not None}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable parity file: {exc}") from exc
    except KeyError as exc:
        raise ModelError(f"{path}: parity file lacks array {exc}") from exc
    lengths = arrays[parity.lengths].astype(np.int64)
    cuts = np.cumsum(lengths)[:-1]

    def split(key: str) -> list[np.ndarray]:
        array = arrays[key]
        if array.shape[0] != lengths.sum():
            raise ModelError(f"{path}: {key} has {array.shape[0]} rows, lengths sum to {lengths.sum()}")
        return np.split(array, cuts)

    inputs = split(parity.ids)
    dtype = np.int32 if np.issubdtype(arrays[parity.ids].dtype, np.integer) else np.float32
    return ParityData(
        file=str(path),
        sequences=[s.astype(dtype) for s in inputs],
        outputs=split(parity.outputs),
        hidden=split(parity.hidden) if parity.hidden else None,
        tolerance=parity.tolerance,
    )


def parity_inputs_key(parity: ParityData) -> str:
    """What :func:`write_parity` calls the inputs: ``ids``, or ``features`` for float vectors."""
    return "features" if parity.sequences[0].ndim == 2 else "ids"


def write_parity(path: Path, parity: ParityData) -> Path:
    """The canonical parity file: ``ids`` (or ``features``), ``lengths``, ``outputs`` (and
    ``hidden``)."""
    arrays = {parity_inputs_key(parity): np.concatenate(parity.sequences),
              "lengths": np.array([len(s) for s in parity.sequences], np.int32),
              "outputs": np.concatenate(parity.outputs)}
    if parity.hidden is not None:
        arrays["hidden"] = np.concatenate(parity.hidden)
    np.savez(path, **arrays)
    return path
