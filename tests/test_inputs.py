"""app.api.inputs on its own: the checks a tensor protocol reuses (flat arrays + lengths)."""

from __future__ import annotations

import numpy as np
import pytest

from app.api.inputs import (
    FLOAT32_MAX,
    InvalidInput,
    checked_features,
    checked_ids,
    feature_arrays,
    input_arrays,
    token_arrays,
)
from app.spec import FeatureInput, TokenInput


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


def test_input_arrays_follow_the_models_input() -> None:
    tokens = TokenInput(np.zeros((5, 2), np.float32), mask_zero=True)
    ids = input_arrays([[1, 4], [2]], tokens, field="x")
    assert [a.tolist() for a in ids] == [[1, 4], [2]] and ids[0].dtype == np.int32
    with pytest.raises(InvalidInput, match=r"^x\.1\.0: token id 0 is not an integer in \[1, 5\)$"):
        input_arrays([[1, 4], [0]], tokens, field="x")
    steps = input_arrays([[[1, 2]], [[3, 4], [5, 6]]], FeatureInput(2), field="y")
    assert [a.tolist() for a in steps] == [[[1, 2]], [[3, 4], [5, 6]]] and steps[1].dtype == np.float32
    with pytest.raises(InvalidInput, match=r"^y\.1\.1: 1 features, the model takes 2$"):
        input_arrays([[[1, 2]], [[3, 4], [5]]], FeatureInput(2), field="y")
    assert [a.tolist() for a in input_arrays([[3]], tokens)] == [[3]]


@pytest.mark.parametrize(("ids", "place", "shown", "more"), [
    ([[0, 1], [2, 9]], "sequences.1.1", "9", ""),  # high is excluded
    ([[-1, 8]], "sequences.0.0", "-1", ""),  # under low
    ([[1], [], [2.5, 3, 99]], "sequences.2.0", "2.5", " (and 1 more)"),  # not integral; empty skipped
    ([[1e300, 1e300, 1e300]], "sequences.0.0", "1e+300", " (and 2 more)"),
])
def test_each_bad_id_is_placed_shown_and_counted(ids: list, place: str, shown: str, more: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        token_arrays(ids, (0, 9))
    assert caught.value.message == f"{place}: token id {shown} is not an integer in [0, 9){more}"
    assert str(caught.value) == caught.value.message and caught.value.kind == "invalid_token"


def test_both_ends_of_the_range_and_empty_sequences_are_kept() -> None:
    arrays = token_arrays([[0, 8], [], [8.0]], (0, 9))
    assert [a.tolist() for a in arrays] == [[0, 8], [], [8]] and all(a.dtype == np.int32 for a in arrays)
    with pytest.raises(InvalidInput, match=r"^token ids must be in \[0, 9\)$"):
        token_arrays([[10**400]], (0, 9))


def test_feature_values_are_finite_float32_and_not_the_mask() -> None:
    with pytest.raises(InvalidInput) as caught:
        feature_arrays([[[1, 2]], [[1, 3e38 * 10], [np.inf, 1]]], FeatureInput(2))
    assert caught.value.message == "sequences.1.0.1: 3e+39 is not a finite float32 number (and 1 more)"
    assert caught.value.kind == "invalid_features"
    with pytest.raises(InvalidInput, match=r"^feature values must be finite float32 numbers$"):
        feature_arrays([[[10**400, 1]]], FeatureInput(2))
    with pytest.raises(InvalidInput) as caught:
        feature_arrays([[[1], [2, 3]], [[1, 2, 3], []]], FeatureInput(2))
    assert caught.value.message == "sequences.0.0: 1 features, the model takes 2 (and 2 more)"
    masked = FeatureInput(2, mask_value=0.5)
    kept = feature_arrays([[[0.5, 1]], [[1, 0.5]]], masked)
    assert [a.tolist() for a in kept] == [[[0.5, 1]], [[1, 0.5]]]
    with pytest.raises(InvalidInput) as caught:
        feature_arrays([[[0.5, 1]], [[1, 1], [0.5, 0.5]], [[0.5, 0.5]]], masked)
    assert caught.value.message == (
        "sequences.1.1: every feature equals the model's Masking value 0.5, so the model would skip "
        "this step as padding; send sequences unpadded (and 1 more)")
    assert float(np.finfo(np.float32).max) == FLOAT32_MAX
    edge = feature_arrays([[[FLOAT32_MAX, -FLOAT32_MAX]]], FeatureInput(2))
    assert np.isfinite(edge[0]).all()


def test_every_refusal_names_its_kind_and_the_default_field() -> None:
    """The kind becomes the error's ``type`` in the answer (invalid_token / invalid_features)."""
    cases = [
        (lambda: input_arrays([[9]], TokenInput(np.zeros((5, 2), np.float32))), "invalid_token",
         "sequences.0.0: token id 9"),
        (lambda: token_arrays([[10**400]], (0, 9)), "invalid_token", "token ids must be in"),
        (lambda: feature_arrays([[[1]]], FeatureInput(2)), "invalid_features", "sequences.0.0: 1 features"),
        (lambda: feature_arrays([[[10**400, 1]]], FeatureInput(2)), "invalid_features", "feature values"),
        (lambda: feature_arrays([[[1, 2]], [[np.nan, 1]]], FeatureInput(2), field="f"), "invalid_features",
         "f.1.0.0: nan"),
        (lambda: checked_features(np.ones((2, 2)), np.array([1, 1]), FeatureInput(2, mask_value=1.0)),
         "invalid_features", "sequences.0.0: every feature"),
        (lambda: checked_features(np.array([[np.inf]]), np.array([1]), FeatureInput(1)),
         "invalid_features", "sequences.0.0.0: inf"),
        (lambda: checked_ids(np.array([5.0]), np.array([1]), (0, 5)), "invalid_token", "sequences.0.0: "),
    ]
    for refuse, kind, start in cases:
        with pytest.raises(InvalidInput) as caught:
            refuse()
        assert caught.value.kind == kind and caught.value.message.startswith(start), caught.value.message


def test_features_split_back_into_each_sequence() -> None:
    flat = np.arange(12, dtype=np.float64).reshape(6, 2)
    parts = checked_features(flat, np.array([1, 2, 3]), FeatureInput(2))
    assert [p.shape for p in parts] == [(1, 2), (2, 2), (3, 2)] and parts[2][0].tolist() == [6.0, 7.0]
