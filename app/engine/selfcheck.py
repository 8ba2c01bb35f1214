"""The start-up self-check: the serving engine against outputs recorded on the GPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from app.engine.runner import Result
from app.errors import ModelError
from app.formats.parity import ParityData

DEFAULT_TOLERANCE = 1e-4


def tolerance_for(chosen: float | None, parity: ParityData | None) -> float:
    """The one chosen (PARITY_TOLERANCE, --tolerance), else the parity data's own, else
    DEFAULT_TOLERANCE."""
    return chosen or (parity.tolerance if parity else None) or DEFAULT_TOLERANCE


@dataclass(frozen=True)
class SelfCheck:
    sequences: int
    max_abs_diff_outputs: float
    max_abs_diff_hidden: float | None
    tolerance: float
    reference: str

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff_outputs, self.max_abs_diff_hidden or 0.0)

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance

    def as_dict(self) -> dict:
        return {"passed": self.passed, **asdict(self)}


def max_abs_diff(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            raise ModelError(f"parity data has rows of shape {e.shape}, the model gives {g.shape}")
    return max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected))


def run_self_check(parity: ParityData, run: Callable[[list[np.ndarray]], list[Result]],
                   tolerance: float) -> SelfCheck:
    results = run(parity.sequences)
    output_diff = max_abs_diff([o for o, _ in results], parity.outputs)
    hidden_diff = None if parity.hidden is None else max_abs_diff([h for _, h in results], parity.hidden)
    return SelfCheck(
        sequences=len(parity.sequences),
        max_abs_diff_outputs=output_diff,
        max_abs_diff_hidden=hidden_diff,
        tolerance=tolerance,
        reference=parity.file,
    )
