"""Each weight-layout mapping against the NumPy GRU written from cuDNN's definition."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.errors import ModelError
from app.formats.gru_layouts import (
    from_cudnn_gru,
    from_keras2_file,
    from_keras_gru,
    from_tf1_canonical,
    from_torch_gru,
)
from app.spec import GRUWeights
from tests.conftest import FIXTURES
from tests.reference import random_native, run_direction, sigmoid, to_cudnngru, to_keras_gru, to_torch


def keras_gru(weights: GRUWeights, x: np.ndarray) -> np.ndarray:
    """The Keras 3 equations on Keras-layout weights (as documented in app.spec)."""
    units = weights.units
    h = np.zeros(units)
    states = []
    for x_t in x.astype(np.float64):
        xz, xr, xh = np.split(x_t @ weights.kernel + weights.bias[0], 3)
        mz, mr, mh = np.split(h @ weights.recurrent_kernel + weights.bias[1], 3)
        z, r = sigmoid(xz + mz), sigmoid(xr + mr)
        h = z * h + (1 - z) * np.tanh(xh + r * mh)
        states.append(h)
    return np.array(states)


def test_blog_vector_cudnngru_to_gru_is_exact() -> None:
    vector = json.loads((FIXTURES / "blog-vector.json").read_text())
    source = {k: np.array(v, np.float32) for k, v in vector["cudnngru"].items()}
    expected = {k: np.array(v, np.float32) for k, v in vector["keras_gru"].items()}
    weights = from_cudnn_gru(source["kernel"], source["recurrent_kernel"], source["bias"], "blog")
    np.testing.assert_array_equal(weights.kernel, expected["kernel"])
    np.testing.assert_array_equal(weights.recurrent_kernel, expected["recurrent_kernel"])
    np.testing.assert_array_equal(weights.bias, expected["bias"])


@pytest.mark.parametrize(("width", "units"), [(7, 3), (3, 7), (32, 128), (5, 5)])
def test_cudnngru_layout_matches_cudnn_equations(width: int, units: int) -> None:
    rng = np.random.default_rng(width * 100 + units)
    native = random_native(rng, width, units)
    x = rng.normal(0, 1, (11, width)).astype(np.float32)
    weights = from_cudnn_gru(*to_cudnngru(native), "test")
    np.testing.assert_allclose(keras_gru(weights, x), run_direction(native, x), atol=1e-6)


def plain_transpose(kernel: np.ndarray, units: int) -> np.ndarray:
    """The tempting conversion: transpose each gate's block (and, when the shape then no
    longer fits, read it back in the Keras shape)."""
    width = kernel.shape[0]
    return np.hstack([kernel[:, g * units:(g + 1) * units].T.reshape(width, units) for g in range(3)])


def test_plain_transpose_is_right_only_when_width_equals_units() -> None:
    """The reshape-vs-transpose trap the blog vector (I == U == 2) cannot catch."""
    rng = np.random.default_rng(1)
    square = random_native(rng, 4, 4)
    kernel, recurrent, bias = to_cudnngru(square)
    np.testing.assert_array_equal(from_cudnn_gru(kernel, recurrent, bias, "test").kernel,
                                  plain_transpose(kernel, 4))

    native = random_native(rng, 6, 4)
    x = rng.normal(0, 1, (9, 6)).astype(np.float32)
    kernel, recurrent, bias = to_cudnngru(native)
    good = from_cudnn_gru(kernel, recurrent, bias, "test")
    plain = GRUWeights(plain_transpose(kernel, 4), good.recurrent_kernel, good.bias)
    assert plain.kernel.shape == good.kernel.shape
    np.testing.assert_allclose(keras_gru(good, x), run_direction(native, x), atol=1e-6)
    assert np.max(np.abs(keras_gru(plain, x) - run_direction(native, x))) > 0.05


@pytest.mark.parametrize(("width", "units"), [(7, 3), (16, 16)])
def test_torch_layout_matches_cudnn_equations(width: int, units: int) -> None:
    rng = np.random.default_rng(7)
    native = random_native(rng, width, units)
    x = rng.normal(0, 1, (9, width)).astype(np.float32)
    t = to_torch(native)
    weights = from_torch_gru(t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], "test")
    np.testing.assert_allclose(keras_gru(weights, x), run_direction(native, x), atol=1e-6)


def test_tf1_canonical_layout_matches_cudnn_equations() -> None:
    rng = np.random.default_rng(3)
    width, units = 5, 4
    native = random_native(rng, width, units)
    x = rng.normal(0, 1, (8, width)).astype(np.float32)
    W, R, bW, bR = native.W, native.R, native.bW, native.bR
    gates_kernel = np.vstack([np.hstack([W["r"].T, W["z"].T]), np.hstack([R["r"].T, R["z"].T])])
    gates_bias = np.concatenate([bW["r"] + bR["r"], bW["z"] + bR["z"]])
    weights = from_tf1_canonical(gates_kernel, gates_bias, W["h"].T, bW["h"], R["h"].T, bR["h"], "test")
    np.testing.assert_allclose(keras_gru(weights, x), run_direction(native, x), atol=1e-6)


def test_keras_gru_layout_is_copied_and_bias_shape_tells_the_layout() -> None:
    rng = np.random.default_rng(4)
    native = random_native(rng, 6, 3)
    keras_weights = to_keras_gru(native)
    copied = from_keras2_file(*keras_weights, "test")
    assert copied.conversion.startswith("none") and copied.reset_after and not copied.cudnn
    np.testing.assert_array_equal(copied.weights.kernel, keras_weights[0])
    converted = from_keras2_file(*to_cudnngru(native), "test")
    assert converted.conversion == "cudnn-gru->keras-gru" and converted.cudnn
    np.testing.assert_allclose(converted.weights.kernel, keras_weights[0])


def test_reset_after_false_bias_is_row_zero_of_the_spec_bias() -> None:
    """Keras' one bias row (3U,) of GRU(reset_after=False) is the spec's row 0; row 1 is zeros."""
    rng = np.random.default_rng(5)
    kernel, recurrent, _ = to_keras_gru(random_native(rng, 4, 3))
    bias = rng.normal(0, 1, 9).astype(np.float32)
    weights, reset_after = from_keras_gru(kernel, recurrent, bias, "layer 'gru'")
    assert not reset_after
    np.testing.assert_array_equal(weights.bias, np.stack([bias, np.zeros(9, np.float32)]))
    with pytest.raises(ModelError, match=r"bias has shape \(7,\)"):
        from_keras_gru(kernel, recurrent, np.zeros(7, np.float32), "layer 'gru'")


def test_wrong_shapes_name_the_layer() -> None:
    with pytest.raises(ModelError, match=r"layer 'x'.*kernel has shape \(4, 10\)"):
        from_cudnn_gru(np.zeros((4, 10)), np.zeros((3, 9)), np.zeros(18), "layer 'x'")
    with pytest.raises(ModelError, match="recurrent_kernel"):
        from_cudnn_gru(np.zeros((4, 9)), np.zeros((3, 8)), np.zeros(18), "layer 'x'")
