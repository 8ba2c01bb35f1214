"""Request inputs: what each sequence carries, checked and turned into the runner's arrays.

Protocol-neutral: the checks work on flat arrays plus sequence lengths, which a JSON body
(:func:`token_arrays`, :func:`feature_arrays`) and a tensor protocol (a ``[batch, steps]``
or ``[batch, steps, features]`` tensor with its lengths) both produce; a problem raises
:class:`InvalidInput` naming its place as ``<field>.<sequence>.<step>[.<feature>]``, which a
protocol module turns into its own error (``/infer``: 422 with the message).

- Token ids: integers in the model's ``[low, high)`` (``low`` is 1 when the ``Embedding``
  has ``mask_zero``: id 0 is padding to that model, and requests are unpadded).
- Feature vectors: exactly ``features`` finite numbers per step (finite in float32, the
  dtype the model computes in). A model with a ``Masking`` layer skips a step whose every
  feature equals ``mask_value`` (state carried over): padding to it, and requests are
  unpadded, so such a step is refused rather than computed differently from the model.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from app.spec import FeatureInput, ModelInput, TokenInput

FLOAT32_MAX = float(np.finfo(np.float32).max)


class InvalidInput(ValueError):
    """One input problem (the first found), with where it is."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message  # kind: "invalid_token" | "invalid_features"


def input_arrays(sequences: list, model_input: ModelInput, field: str = "sequences") -> list[np.ndarray]:
    """A JSON body's sequences as the runner's per-sequence arrays, checked for ``model_input``."""
    if isinstance(model_input, TokenInput):
        return token_arrays(sequences, model_input.id_range, field)
    return feature_arrays(sequences, model_input, field)


def token_arrays(sequences: list[list[float]], id_range: tuple[int, int],
                 field: str = "sequences") -> list[np.ndarray]:
    """One int32 array per sequence. float64 holds every integer up to 2**53 exactly, far
    past any vocabulary, so integral floats (``2.0``) are checked exactly too."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    low, high = id_range
    try:
        flat = np.fromiter(chain.from_iterable(sequences), dtype=np.float64, count=int(lengths.sum()))
    except OverflowError:
        raise InvalidInput("invalid_token", f"token ids must be in [{low}, {high})") from None
    return checked_ids(flat, lengths, id_range, field)


def checked_ids(flat: np.ndarray, lengths: np.ndarray, id_range: tuple[int, int],
                field: str = "sequences") -> list[np.ndarray]:
    """``flat`` (all sequences' ids, concatenated) split into int32 arrays, once every id is
    an integer in ``id_range``."""
    low, high = id_range
    bad = np.flatnonzero((flat < low) | (flat >= high) | (flat != np.floor(flat)))
    if bad.size:
        raise InvalidInput("invalid_token", f"{_place(field, lengths, int(bad[0]))}: token id "
                           f"{flat[bad[0]]:g} is not an integer in [{low}, {high})" + _more(bad.size))
    return np.split(flat.astype(np.int32), np.cumsum(lengths)[:-1])


def feature_arrays(sequences: list[list[list[float]]], model_input: FeatureInput,
                   field: str = "sequences") -> list[np.ndarray]:
    """One ``(steps, features)`` float32 array per sequence. The numbers are already JSON
    numbers (the request model checks that); here: the width of every step, then values."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    steps = list(chain.from_iterable(sequences))
    widths = np.fromiter(map(len, steps), dtype=np.int64, count=len(steps))
    wrong = np.flatnonzero(widths != model_input.features)
    if wrong.size:
        first = int(wrong[0])
        raise InvalidInput("invalid_features", f"{_place(field, lengths, first)}: {widths[first]} "
                           f"features, the model takes {model_input.features}" + _more(wrong.size))
    try:
        flat = np.array(steps, dtype=np.float64).reshape(len(steps), model_input.features)
    except OverflowError:  # an integer past float64's range
        raise InvalidInput("invalid_features", "feature values must be finite float32 numbers") from None
    return checked_features(flat, lengths, model_input, field)


def checked_features(flat: np.ndarray, lengths: np.ndarray, model_input: FeatureInput,
                     field: str = "sequences") -> list[np.ndarray]:
    """``flat (steps, features)`` (all sequences' steps, concatenated) split into float32
    arrays, once every value is finite in float32 and no step is the model's padding."""
    bad = np.flatnonzero(~(np.abs(flat) <= FLOAT32_MAX))  # NaN compares False
    if bad.size:
        row, column = divmod(int(bad[0]), model_input.features)
        raise InvalidInput("invalid_features", f"{_place(field, lengths, row)}.{column}: "
                           f"{flat.flat[bad[0]]:g} is not a finite float32 number" + _more(bad.size))
    values = flat.astype(np.float32)
    if model_input.mask_value is not None:
        masked = np.flatnonzero(np.all(values == np.float32(model_input.mask_value), axis=1))
        if masked.size:
            raise InvalidInput(
                "invalid_features",
                f"{_place(field, lengths, int(masked[0]))}: every feature equals the model's "
                f"Masking value {model_input.mask_value:g}, so the model would skip this step as "
                "padding; send sequences unpadded" + _more(masked.size))
    return np.split(values, np.cumsum(lengths)[:-1])


def _place(field: str, lengths: np.ndarray, index: int) -> str:
    """``field.<sequence>.<step>`` of the ``index``-th step of the concatenation."""
    offsets = np.cumsum(lengths)
    row = int(np.searchsorted(offsets, index, side="right"))
    return f"{field}.{row}.{index - (int(offsets[row - 1]) if row else 0)}"


def _more(count: int) -> str:
    return f" (and {count - 1} more)" if count > 1 else ""
