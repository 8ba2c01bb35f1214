"""The canonical model description: what it tells about a model, and the shape errors it
refuses with a message naming the layer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.errors import ModelError
from app.formats.bundle import load_bundle
from app.spec import FeatureInput, GRUVariant, ModelSpec, TokenInput
from tests.conftest import DEFAULT_MODEL
from tests.helpers import spec_of
from tests.reference import random_model


@pytest.fixture(scope="module")
def segmenter() -> ModelSpec:
    return load_bundle(DEFAULT_MODEL).spec


def test_the_default_model_is_described_as_it_is(segmenter: ModelSpec) -> None:
    layer = {"type": "GRU", "units": 128, "bidirectional": True, "merge_mode": "concat", "output_width": 256,
             "reset_after": True, "recurrent_activation": "sigmoid", "activation": "tanh"}
    assert segmenter.describe() == {
        "input": {"kind": "tokens", "vocab_size": 96, "width": 32, "mask_zero": False},
        "recurrent": [{"name": "bigru_0", **layer}, {"name": "bigru_1", **layer}],
        "dense": [{"name": "tags", "units": 2, "activation": "softmax", "use_bias": True}],
        "output_width": 2,
        "hidden_width": 256,
    }
    assert (segmenter.vocab_size, segmenter.input.width) == (96, 32)
    assert segmenter.validate() is segmenter


def test_a_headless_unidirectional_stack_is_described(tmp_path: Path) -> None:
    model = random_model(np.random.default_rng(0), vocab=12, width=5, units=3, layers=2,
                         bidirectional=False, head=None)
    spec = spec_of(model, tmp_path)
    described = spec.describe()
    assert described["dense"] == [] and described["output_width"] == described["hidden_width"] == 3
    assert [(r["units"], r["bidirectional"], r["merge_mode"], r["output_width"])
            for r in described["recurrent"]] == [(3, False, None, 3)] * 2
    assert spec.layers[0].directions() == [spec.layers[0].forward]


@pytest.mark.parametrize("merge_mode", ["sum", "ave", "mul"])
def test_merged_directions_are_as_wide_as_one(tmp_path: Path, merge_mode: str) -> None:
    model = random_model(np.random.default_rng(1), vocab=12, width=5, units=3, layers=2,
                         merge_mode=merge_mode)
    spec = spec_of(model, tmp_path)
    assert [layer.output_width for layer in spec.layers] == [3, 3]
    assert spec.layers[1].forward.input_width == 3


def refused(spec: ModelSpec, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        spec.validate()


def test_shape_errors_name_the_layer(segmenter: ModelSpec) -> None:
    first, second = segmenter.layers
    (head,) = segmenter.dense
    tokens = segmenter.input
    assert isinstance(tokens, TokenInput)
    refused(replace(segmenter, input=replace(tokens, embeddings=tokens.embeddings[0])),
            r"embedding: expected a 2-D matrix")
    refused(replace(segmenter, input=FeatureInput(0)), r"^input: 0 features per step$")
    refused(replace(segmenter, layers=()), r"^the model has no recurrent \(GRU or LSTM\) layer$")
    refused(replace(segmenter, layers=(replace(first, merge_mode="max"), second)),
            r"bigru_0: unsupported merge_mode 'max'")
    narrow = replace(first.forward, kernel=first.forward.kernel[:31])
    refused(replace(segmenter, layers=(replace(first, forward=narrow), second)),
            r"bigru_0 \(forward\): kernel has shape \(31, 384\), expected \(32, 384\)")
    square = replace(second.backward, recurrent_kernel=second.backward.recurrent_kernel[:, :383])
    refused(replace(segmenter, layers=(first, replace(second, backward=square))),
            r"bigru_1 \(backward\): recurrent_kernel has shape \(128, 383\)")
    flat_bias = replace(first.backward, bias=first.backward.bias.reshape(-1))
    refused(replace(segmenter, layers=(replace(first, backward=flat_bias), second)),
            r"bigru_0 \(backward\): bias has shape \(768,\), expected \(2, 384\)")
    refused(replace(segmenter, dense=(replace(head, kernel=head.kernel[:255]),)),
            r"tags: kernel has shape \(255, 2\), expected \(256, units\)")
    refused(replace(segmenter, dense=(replace(head, kernel=head.kernel[0]),)),
            r"tags: kernel has shape \(2,\)")
    refused(replace(segmenter, dense=(replace(head, bias=head.bias[:1]),)),
            r"tags: bias has shape \(1,\), expected \(2,\)")
    refused(replace(segmenter, dense=(replace(head, activation="swish"),)),
            r"tags: unsupported activation 'swish'")
    assert replace(segmenter, dense=(replace(head, bias=None),)).validate().dense[0].bias is None
    refused(replace(segmenter, layers=(replace(first, variant=GRUVariant(activation="gelu")), second)),
            r"^bigru_0: activation='gelu' is not supported \(supported: sigmoid, ")
    refused(replace(segmenter, layers=(first, replace(second, variant=GRUVariant(recurrent_activation="x")))),
            r"^bigru_1: recurrent_activation='x' is not supported")
    # reset_after=False has one bias row: a non-zero second row would be silently ignored
    refused(replace(segmenter, layers=(replace(first, variant=GRUVariant(reset_after=False)), second)),
            r"^bigru_0 \(forward\): reset_after=False keeps its one bias row in row 0; row 1 must be zeros$")
    one_row = replace(first.backward, bias=np.stack([first.backward.bias[0], np.zeros(384, np.float32)]))
    forward = replace(first.forward, bias=one_row.bias)
    plain = replace(first, forward=forward, backward=one_row, variant=GRUVariant(reset_after=False))
    assert replace(segmenter, layers=(plain, second)).validate().layers[0].variant.reset_after is False


def test_inputs_describe_sample_and_pad_themselves() -> None:
    tokens = TokenInput(np.zeros((7, 3), np.float32), mask_zero=True)
    assert tokens.describe() == {"kind": "tokens", "vocab_size": 7, "width": 3, "mask_zero": True}
    ids = tokens.sample(np.random.default_rng(0), 500)
    assert ids.dtype == np.int32 and ids.shape == (500,) and (ids.min(), ids.max()) == (1, 6)
    assert tokens.blank(2, 5).dtype == np.int32 and tokens.blank(2, 5).shape == (2, 5)
    assert not tokens.blank(2, 5).any()
    features = FeatureInput(1, mask_value=0.0)
    assert features.validate() is None  # one feature per step is a model
    assert features.describe() == {"kind": "features", "features": 1, "mask_value": 0.0}
    steps = FeatureInput(4).sample(np.random.default_rng(0), 6)
    assert steps.dtype == np.float32 and steps.shape == (6, 4) and steps.std() > 0.3
    blank = FeatureInput(4).blank(2, 5)
    assert blank.dtype == np.float32 and blank.shape == (2, 5, 4) and not blank.any()


def test_a_dense_stack_checks_each_width_against_the_one_before(segmenter: ModelSpec) -> None:
    (head,) = segmenter.dense
    wide = replace(head, name="wide", kernel=np.zeros((256, 16), np.float32), bias=None, activation="relu")
    narrow = replace(head, kernel=np.zeros((16, 2), np.float32))
    assert replace(segmenter, dense=(wide, narrow)).validate().output_width == 2
    refused(replace(segmenter, dense=(wide, head)),
            r"^tags: kernel has shape \(256, 2\), expected \(16, units\)$")
    refused(replace(segmenter, dense=(replace(head, activation="gelu"),)),
            r"^tags: unsupported activation 'gelu' \(supported: linear, softmax, sigmoid, tanh, relu\)$")


def test_directions_of_different_widths_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    wide = spec_of(random_model(rng, vocab=12, width=5, units=4, layers=1), tmp_path / "a")
    narrow = spec_of(random_model(rng, vocab=12, width=5, units=3, layers=1), tmp_path / "b")
    layer = replace(wide.layers[0], backward=narrow.layers[0].backward)
    with pytest.raises(ModelError, match="forward and backward have different units"):
        replace(wide, layers=(layer,)).validate()
