"""app.api.inputs on its own: the checks a tensor protocol reuses (flat arrays + lengths)."""

from __future__ import annotations

import numpy as np
import pytest

from app.api.inputs import InvalidInput, checked_features, checked_ids, feature_arrays, token_arrays
from app.spec import FeatureInput


def test_tensor_input_is_split_by_lengths_and_named_by_its_field() -> None:
    model_input = FeatureInput(3, mask_value=-1.0)
    flat = np.arange(15, dtype=np.float64).reshape(5, 3)
    parts = checked_features(flat, np.array([2, 3]), model_input, field="inputs.0.data")
    assert [p.shape for p in parts] == [(2, 3), (3, 3)] and parts[0].dtype == np.float32
    flat[3] = -1.0
    with pytest.raises(InvalidInput, match=r"^inputs\.0\.data\.1\.1: every feature equals"):
        checked_features(flat, np.array([2, 3]), model_input, field="inputs.0.data")
    flat[4, 2] = np.nan
    with pytest.raises(InvalidInput, match=r"^inputs\.0\.data\.1\.2\.2: nan is not a finite float32"):
        checked_features(flat, np.array([2, 3]), FeatureInput(3), field="inputs.0.data")


def test_ids_report_the_first_bad_place_and_how_many_more() -> None:
    with pytest.raises(InvalidInput, match=r"^sequences\.1\.0: token id 0 is not an integer in \[1, 9\) "
                       r"\(and 1 more\)$") as caught:
        checked_ids(np.array([3, 4, 0, 9.5]), np.array([2, 2]), (1, 9))
    assert caught.value.kind == "invalid_token"
    assert [a.tolist() for a in token_arrays([[1, 2.0], [3]], (0, 5))] == [[1, 2], [3]]


def test_a_step_of_the_wrong_width_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"^sequences\.0\.1: 2 features, the model takes 3$"):
        feature_arrays([[[1, 2, 3], [1, 2]]], FeatureInput(3))
