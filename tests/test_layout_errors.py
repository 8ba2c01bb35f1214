"""A weight of the wrong shape is refused with a message naming the layer, the tensor, the
shape found and the shape expected (what a user reads when start-up stops); weights in any
float dtype come out as contiguous float32, the one dtype the spec holds."""

from __future__ import annotations

from collections.abc import Callable

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
from tests.reference import (
    random_native,
    run_direction,
    to_cudnngru,
    to_keras_gru,
    to_tf1_canonical,
    to_torch,
)
from tests.test_layouts import keras_gru

WHERE = "layer 'gru_1' (backward)"
WIDTH, UNITS = 5, 3
NATIVE = random_native(np.random.default_rng(0), WIDTH, UNITS)


def cudnn(**changes: np.ndarray) -> Callable[[], object]:
    kernel, recurrent, bias = to_cudnngru(NATIVE)
    given = {"kernel": kernel, "recurrent_kernel": recurrent, "bias": bias} | changes
    return lambda: from_cudnn_gru(**given, where=WHERE)


def keras(**changes: np.ndarray) -> Callable[[], object]:
    kernel, recurrent, bias = to_keras_gru(NATIVE)
    given = {"kernel": kernel, "recurrent_kernel": recurrent, "bias": bias} | changes
    return lambda: from_keras_gru(**given, where=WHERE)


def keras2(**changes: np.ndarray) -> Callable[[], object]:
    kernel, recurrent, bias = to_cudnngru(NATIVE)
    given = {"kernel": kernel, "recurrent_kernel": recurrent, "bias": bias} | changes
    return lambda: from_keras2_file(**given, where=WHERE)


def torch(**changes: np.ndarray | None) -> Callable[[], object]:
    given = dict(to_torch(NATIVE)) | changes
    return lambda: from_torch_gru(**given, where=WHERE)


TF1_NAMES = {"gates/kernel": "gates_kernel", "gates/bias": "gates_bias",
             "candidate/input_projection/kernel": "input_kernel",
             "candidate/input_projection/bias": "input_bias",
             "candidate/hidden_projection/kernel": "hidden_kernel",
             "candidate/hidden_projection/bias": "hidden_bias"}


def tf1(**changes: np.ndarray) -> Callable[[], object]:
    given = {TF1_NAMES[name]: array for name, array in to_tf1_canonical(NATIVE).items()} | changes
    return lambda: from_tf1_canonical(**given, where=WHERE)


def zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


REFUSED = [
    (cudnn(recurrent_kernel=zeros(3, 8)), "recurrent_kernel has shape (3, 8), expected (U, 3U)"),
    (cudnn(recurrent_kernel=zeros(9)), "recurrent_kernel has shape (9,), expected (U, 3U)"),
    (cudnn(kernel=zeros(5, 8)), "kernel has shape (5, 8), expected (I, 9)"),
    (cudnn(kernel=zeros(45)), "kernel has shape (45,), expected (I, 9)"),
    (cudnn(bias=zeros(17)), "bias has shape (17,), expected (18,)"),
    (keras(recurrent_kernel=zeros(3, 3)), "recurrent_kernel has shape (3, 3), expected (U, 3U)"),
    (keras(bias=zeros(2, 8)), "bias has shape (2, 8), expected (2, 9)"),
    (keras2(recurrent_kernel=zeros(4, 9)), "recurrent_kernel has shape (4, 9), expected (U, 3U)"),
    (keras2(kernel=zeros(5, 8)), "kernel has shape (5, 8), expected (I, 9)"),  # read as CuDNNGRU
    (keras2(bias=zeros(17)), "bias has shape (17,), expected (2, 9)"),  # read as GRU
    (torch(weight_hh=zeros(8, 3)), "weight_hh has shape (8, 3), expected (3U, U)"),
    (torch(weight_hh=zeros(27)), "weight_hh has shape (27,), expected (3U, U)"),
    (torch(weight_ih=zeros(8, 5)), "weight_ih has shape (8, 5), expected (3U, I)"),
    (torch(weight_ih=zeros(45)), "weight_ih has shape (45,), expected (3U, I)"),
    (torch(bias_ih=zeros(8)), "bias_ih has shape (8,), expected (9,)"),
    (torch(bias_hh=zeros(10)), "bias_hh has shape (10,), expected (9,)"),
    (tf1(hidden_kernel=zeros(3, 4)), "candidate/hidden_projection/kernel has shape (3, 4), expected (3, 3)"),
    (tf1(gates_kernel=zeros(8, 5)), "gates/kernel has shape (8, 5), expected (8, 6)"),
    (tf1(gates_bias=zeros(5)), "gates/bias has shape (5,), expected (6,)"),
    (tf1(input_kernel=zeros(5, 4)), "candidate/input_projection/kernel has shape (5, 4), expected (5, 3)"),
    (tf1(input_bias=zeros(4)), "candidate/input_projection/bias has shape (4,), expected (3,)"),
    (tf1(hidden_bias=zeros(4)), "candidate/hidden_projection/bias has shape (4,), expected (3,)"),
]


@pytest.mark.parametrize(("read", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_wrong_shapes_are_refused_with_layer_tensor_and_shapes(read: Callable[[], object],
                                                                message: str) -> None:
    with pytest.raises(ModelError) as refused:
        read()
    assert str(refused.value) == f"{WHERE}: {message}"


def test_a_one_dimensional_tf1_hidden_kernel_is_refused() -> None:
    with pytest.raises(ModelError, match=r"candidate/hidden_projection/kernel has shape \(3,\)"):
        tf1(hidden_kernel=zeros(3))()


def test_layouts_given_float64_give_float32() -> None:
    kernel, recurrent, bias = (np.asfortranarray(a.astype(np.float64)) for a in to_cudnngru(NATIVE))
    converted = from_cudnn_gru(kernel, recurrent, bias, WHERE)
    copied, _ = from_keras_gru(*(a.astype(np.float64) for a in to_keras_gru(NATIVE)), WHERE)
    torch_weights = from_torch_gru(*(a.astype(np.float64) for a in to_torch(NATIVE).values()), WHERE)
    tf1_weights = from_tf1_canonical(*(a.astype(np.float64) for a in to_tf1_canonical(NATIVE).values()),
                                     WHERE)
    for weights in (converted, copied, torch_weights, tf1_weights):
        for array in (weights.kernel, weights.recurrent_kernel, weights.bias):
            assert array.dtype == np.float32 and array.flags.c_contiguous


def test_keras2_files_name_the_conversion_they_needed() -> None:
    read = keras2()()
    assert (read.conversion, read.reset_after, read.cudnn) == ("cudnn-gru->keras-gru", True, True)  # type: ignore[attr-defined]
    read = from_keras2_file(*to_keras_gru(NATIVE), WHERE)
    assert (read.conversion, read.reset_after, read.cudnn) == ("none (Keras GRU layout)", True, False)


def test_a_one_row_bias_is_read_as_reset_after_false() -> None:
    """GRU(reset_after=False) stores one bias row ``(3U,)``: it goes to row 0, row 1 is zeros,
    and the layout is reported as reset_after=False (its equations differ from cuDNN's)."""
    kernel, recurrent, _ = to_keras_gru(NATIVE)
    bias = np.arange(9, dtype=np.float32) + 1
    for read in (from_keras2_file(kernel, recurrent, bias, WHERE),):
        assert (read.reset_after, read.cudnn) == (False, False)
        np.testing.assert_array_equal(read.weights.bias, np.stack([bias, np.zeros(9, np.float32)]))
    weights, reset_after = from_keras_gru(kernel, recurrent, bias, WHERE)
    assert reset_after is False and weights.bias.shape == (2, 9) and not weights.bias[1].any()


def test_torch_without_biases_means_zero_biases() -> None:
    weights = torch(bias_ih=None, bias_hh=None)()
    assert weights.bias.dtype == np.float32 and not weights.bias.any()  # type: ignore[attr-defined]
    unbiased = random_native(np.random.default_rng(0), WIDTH, UNITS)
    for gate in "rzh":
        unbiased.bW[gate][:] = 0
        unbiased.bR[gate][:] = 0
    x = np.random.default_rng(1).normal(0, 1, (6, WIDTH)).astype(np.float32)
    expected = run_direction(unbiased, x)
    np.testing.assert_allclose(keras_gru(weights, x), expected, atol=1e-6)  # type: ignore[arg-type]


def test_keras_gru_weights_are_taken_as_they_are() -> None:
    kernel, recurrent, bias = to_keras_gru(NATIVE)
    weights, reset_after = from_keras_gru(kernel, recurrent, bias, WHERE)
    assert reset_after is True
    np.testing.assert_array_equal(weights.kernel, kernel)
    np.testing.assert_array_equal(weights.recurrent_kernel, recurrent)
    np.testing.assert_array_equal(weights.bias, bias)
