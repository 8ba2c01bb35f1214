"""The served model as the protocol's named tensors, shared by the HTTP and gRPC front ends.

Inputs: ``ids`` (INT32 or INT64, ``[batch, steps]``) for a model taking tokens, or
``features`` (FP32, ``[batch, steps, F]``) for one taking feature vectors; and, for
right-padded rows, ``lengths`` (``[batch]``, each in ``1..steps``); without ``lengths`` every
row is one whole sequence of ``steps`` steps. The values are checked by :mod:`app.api.inputs`,
as ``/infer``'s are. Outputs: ``outputs`` (FP32 ``[batch, steps, C]``) and ``hidden`` (FP32
``[batch, steps, H]``, the last recurrent layer's merged states), rows zeroed past each length.
Each row is computed as if alone, exactly as ``/infer`` computes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from app.api.inputs import InvalidInput, checked_features, checked_ids
from app.api.kserve.tensors import Tensor, invalid
from app.engine.runner import Result
from app.service.model_service import ModelService
from app.spec import ModelInput, TokenInput

LENGTHS = "lengths"
OUTPUTS, HIDDEN = "outputs", "hidden"
OUTPUT_NAMES = [OUTPUTS, HIDDEN]  # all of them, in this order, when a request names none
RESULT_INDEX = {OUTPUTS: 0, HIDDEN: 1}  # where each is in a runner's Result
INDEX_DATATYPES = ("INT32", "INT64")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "keras": "tensorflow_keras"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1: any size

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def input_specs(model_input: ModelInput) -> list[TensorSpec]:
    # ids and lengths also take INT64; metadata names one datatype, the narrower one.
    main = (TensorSpec(model_input.name, "INT32", [-1, -1]) if isinstance(model_input, TokenInput)
            else TensorSpec(model_input.name, "FP32", [-1, -1, model_input.features]))
    return [main, TensorSpec(LENGTHS, "INT32", [-1])]


def output_specs(service: ModelService) -> list[TensorSpec]:
    assert service.bundle is not None
    spec = service.bundle.spec
    return [TensorSpec(OUTPUTS, "FP32", [-1, -1, spec.output_width]),
            TensorSpec(HIDDEN, "FP32", [-1, -1, spec.hidden_width])]


def model_metadata(service: ModelService, versions: list[str]) -> dict:
    """``versions``: the model's versions ready now."""
    return {"name": service.name, "versions": versions,
            "platform": PLATFORMS.get(service.settings.engine, service.settings.engine),
            "inputs": [t.as_dict() for t in input_specs(service.model_input)],
            "outputs": [t.as_dict() for t in output_specs(service)]}


def sequences_from(inputs: list[Tensor], model_input: ModelInput, max_batch: int,
                   max_len: int) -> tuple[list[np.ndarray], int]:
    """The unpadded sequences the input tensors carry, and ``steps`` (the padded width)."""
    name = model_input.name
    by_name = named(inputs, "input", (name, LENGTHS))
    tensor = by_name.get(name)
    if tensor is None:
        raise invalid(f"input '{name}' is missing")
    expected = input_specs(model_input)[0]
    datatypes = INDEX_DATATYPES if isinstance(model_input, TokenInput) else ("FP32",)
    if tensor.datatype not in datatypes or tensor.array.ndim != len(expected.shape) or (
            tensor.array.ndim == 3 and tensor.array.shape[2] != expected.shape[2]):
        raise invalid(f"input '{name}' must be {' or '.join(datatypes)} of shape "
                      f"{_shape_text(expected.shape)}; got {tensor.datatype} {tensor.shape}")
    batch, steps = tensor.array.shape[:2]
    if not 1 <= batch <= max_batch or not 1 <= steps <= max_len:
        raise invalid(f"input '{name}' has shape {tensor.shape}; this deployment takes 1..{max_batch} "
                      f"rows of 1..{max_len} steps")
    lengths = row_lengths(by_name.get(LENGTHS), batch, steps, name)
    flat = np.concatenate([row[:length] for row, length in zip(tensor.array, lengths)]).astype(np.float64)
    try:
        if isinstance(model_input, TokenInput):
            return checked_ids(flat, lengths, model_input.id_range, name), steps
        return checked_features(flat, lengths, model_input, name), steps
    except InvalidInput as exc:
        raise invalid(exc.message) from None


def _shape_text(shape: list[int]) -> str:
    names = ["batch", "steps"]
    return "[" + ", ".join(names[i] if size < 0 else str(size) for i, size in enumerate(shape)) + "]"


def row_lengths(tensor: Tensor | None, batch: int, steps: int, input_name: str) -> np.ndarray:
    if tensor is None:
        return np.full(batch, steps, dtype=np.int64)
    if tensor.datatype not in INDEX_DATATYPES or tensor.shape != [batch]:
        raise invalid(f"input '{LENGTHS}' must be INT32 or INT64 of shape [{batch}]; got "
                      f"{tensor.datatype} {tensor.shape}")
    lengths = tensor.array.astype(np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > steps))
    if bad.size:
        raise invalid(f"{LENGTHS}.{bad[0]}: length {lengths[bad[0]]} is not in 1..{steps} (the steps of "
                      f"'{input_name}')")
    return lengths


def named(tensors: list[Tensor], kind: str, known: tuple[str, ...]) -> dict[str, Tensor]:
    by_name: dict[str, Tensor] = {}
    for tensor in tensors:
        if tensor.name not in known:
            raise invalid(f"unknown {kind} '{tensor.name}'; this model has {', '.join(known)}")
        if tensor.name in by_name:
            raise invalid(f"{kind} '{tensor.name}' is given twice")
        by_name[tensor.name] = tensor
    return by_name


def check_output_names(names: list[str]) -> None:
    for index, name in enumerate(names):
        if name not in OUTPUT_NAMES:
            raise invalid(f"unknown output '{name}'; this model has {', '.join(OUTPUT_NAMES)}")
        if name in names[:index]:
            raise invalid(f"output '{name}' is requested twice")


def output_widths(service: ModelService) -> dict[str, int]:
    return {spec.name: spec.shape[2] for spec in output_specs(service)}


async def gathered_tensors(parts: AsyncIterator[list[Result]], batch: int, steps: int,
                           widths: dict[str, int], names: list[str]) -> list[Tensor]:
    """The named outputs as ``[batch, steps, width]`` FP32 tensors, zero past each row's
    length, filled part by part as the parts come (in sequence order): only the parts in
    flight exist beside them."""
    arrays = {name: np.zeros((batch, steps, widths[name]), dtype=np.float32) for name in names}
    row = 0
    async for results in parts:
        for result in results:
            for name, array in arrays.items():
                values = result[RESULT_INDEX[name]]
                array[row, : len(values)] = values
            row += 1
        del results
    if row != batch:
        raise RuntimeError(f"the parts held {row} rows for a batch of {batch}")
    return [Tensor(name, "FP32", arrays[name]) for name in names]
