"""Finding the embedding and the head among a checkpoint's loose tensors.

PyTorch state_dicts and TF 1.x checkpoints name their tensors freely. Once the GRU's own
tensors are known, the embedding is the one 2-D matrix whose width is the first GRU
layer's input width, and the head is the one matrix that takes the last layer's output;
``architecture.tensors`` names them when that is ambiguous.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from app.errors import ModelError


def pick_one(candidates: list[str], what: str, where: str, hint: str) -> str:
    if len(candidates) == 1:
        return candidates[0]
    found = "none" if not candidates else ", ".join(sorted(candidates))
    raise ModelError(f"{where}: cannot tell which tensor is the {what} (candidates: {found}); "
                     f"name it in the architecture file's {hint}")


def find_by_shape(tensors: dict[str, np.ndarray], exclude: set[str],
                  fits: Callable[[np.ndarray], bool]) -> list[str]:
    return [name for name, array in tensors.items()
            if name not in exclude and array.ndim == 2 and fits(array)]
