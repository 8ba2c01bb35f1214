"""Reads a Keras model description (Keras 2 ``model_config``, Keras 3 ``config.json``) into a
layer plan, without running it.

Handles Sequential models (Keras <= 2.1 stores the layers as a bare list, 2.2+ as
``{"name", "layers"}``) and Functional models (Keras 2 and Keras 3 node formats; the first
output is the one served), including the "manual" bidirectional build:
two GRU (or LSTM) layers joined by a merge layer, one of them fed reversed input through a
``Lambda``.
A ``Lambda``'s body is marshalled bytecode: it is never executed, only searched for the
name ``reverse`` to recognise the reversing layers.

Each GRU's variant (:class:`~app.spec.GRUVariant`) comes from its config: ``reset_after``
(missing in Keras <= 2.1 configs: False), ``recurrent_activation``, ``activation``; each
LSTM's (:class:`~app.spec.LSTMVariant`) from its two activations (a missing
``recurrent_activation`` is Keras 2's default, ``hard_sigmoid``; ``unit_forget_bias`` only
initialises). ``CuDNNGRU`` and ``CuDNNLSTM`` are always cuDNN's equations. In a Keras 2
description ``hard_sigmoid`` is Keras 2's function; in a Keras 3 one it is Keras 3's
(refused), and Keras 2's appears as the function the builder registers.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from app.errors import ModelError
from app.formats.plan import DenseStep, EmbeddingStep, MaskingStep, RecurrentStep, Step
from app.spec import (
    CUDNN,
    CUDNN_LSTM,
    DENSE_ACTIVATIONS,
    GRU_ACTIVATIONS,
    KERAS2_HARD_SIGMOID,
    CellVariant,
    GRUVariant,
    LSTMVariant,
)

# class name -> (cell, whether it claims cuDNN's layout)
RECURRENT_CLASSES = {
    "CuDNNGRU": ("GRU", True), "GRU": ("GRU", False), "GRUV2": ("GRU", False),
    "CuDNNLSTM": ("LSTM", True), "LSTM": ("LSTM", False), "LSTMV2": ("LSTM", False),
}
INFERENCE_NO_OPS = {
    "InputLayer", "Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout",
    "AlphaDropout", "ActivityRegularization", "Identity",
}
MERGE_LAYERS = {"Concatenate": "concat", "Add": "sum", "Average": "ave", "Multiply": "mul"}
SUPPORTED = (
    "Embedding, Masking, Bidirectional(CuDNNGRU | GRU | CuDNNLSTM | LSTM), CuDNNGRU, GRU, "
    "CuDNNLSTM, LSTM, Dense, TimeDistributed(Dense), Activation, Dropout-like layers, and a manual "
    "forward/backward pair joined by Concatenate | Add | Average | Multiply"
)


@dataclass(frozen=True)
class Layer:
    class_name: str
    name: str
    config: dict[str, Any]
    inbound: tuple[str, ...]


def parse_model_config(raw: str | bytes, directions: dict[str, str] | None = None,
                       keras3: bool = False) -> list[Step]:
    """``directions`` (layer name -> "forward" | "backward") overrides what the graph tells.

    ``keras3``: the description is a Keras 3 ``config.json``, where ``hard_sigmoid`` means
    Keras 3's ``relu6(x + 3) / 6``, not Keras 2's ``clip(0.2 x + 0.5, 0, 1)``.
    """
    try:
        config = json.loads(raw)
        class_name = config["class_name"]
        body = config["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model_config: not a Keras model description ({exc})") from exc
    if class_name == "Sequential":
        layers = body if isinstance(body, list) else body.get("layers", [])
        steps: list[Step] = []
        for entry in layers:
            _append(steps, _layer(entry, ()), keras3)
        return steps
    if class_name in ("Functional", "Model"):
        return _GraphWalker(body, directions or {}, keras3).steps()
    raise ModelError(f"model_config: top-level {class_name!r} is not supported (Sequential or Functional)")


def _layer(entry: dict[str, Any], inbound: tuple[str, ...]) -> Layer:
    config = entry.get("config", {})
    name = entry.get("name") or config.get("name", "?")
    return Layer(entry.get("class_name", "?"), name, config, inbound)


def _append(steps: list[Step], layer: Layer, keras3: bool) -> None:
    """Add ``layer``'s step to ``steps``; folds an ``Activation`` into a linear Dense."""
    if layer.class_name in INFERENCE_NO_OPS:
        return
    if layer.class_name == "Activation":
        dense = steps[-1] if steps else None
        if not isinstance(dense, DenseStep) or dense.activation != "linear":
            raise ModelError(f"layer {layer.name!r}: Activation is supported only right after a linear Dense")
        steps[-1] = DenseStep(dense.name, _dense_activation(layer, layer.config))
        return
    steps.append(_step(layer, keras3))


def _step(layer: Layer, keras3: bool) -> Step:
    cls, config = layer.class_name, layer.config
    if cls == "Embedding":
        return EmbeddingStep(layer.name, bool(config.get("mask_zero", False)))
    if cls == "Masking":
        return MaskingStep(layer.name, float(config.get("mask_value", 0.0)))
    if cls == "Bidirectional":
        inner = config.get("layer", {})
        claims, variant = _check_recurrent(layer.name, inner.get("class_name", "?"), inner.get("config", {}),
                                     keras3)
        backward = config.get("backward_layer")
        if backward and _check_recurrent(layer.name, backward.get("class_name", "?"),
                                   backward.get("config", {}), keras3) != (claims, variant):
            raise ModelError(f"layer {layer.name!r}: its backward_layer is a different layer from "
                             "its forward layer; not supported")
        merge_mode = config.get("merge_mode", "concat")
        if merge_mode not in MERGE_LAYERS.values():
            raise ModelError(f"layer {layer.name!r}: merge_mode {merge_mode!r} is not supported "
                             "(concat, sum, ave, mul)")
        return RecurrentStep(layer.name, merge_mode, claims_cudnn=claims, variant=variant)
    if cls in RECURRENT_CLASSES:
        claims, variant = _check_recurrent(layer.name, cls, config, keras3)
        if config.get("go_backwards"):
            raise ModelError(f"layer {layer.name!r}: a lone {cls} with go_backwards=True is not supported")
        return RecurrentStep(layer.name, None, claims_cudnn=claims, variant=variant)
    if cls == "TimeDistributed" and config.get("layer", {}).get("class_name") == "Dense":
        return DenseStep(layer.name, _dense_activation(layer, config["layer"]["config"]))
    if cls == "Dense":
        return DenseStep(layer.name, _dense_activation(layer, config))
    raise ModelError(f"layer {layer.name!r}: {cls} is not supported (supported: {SUPPORTED})")


def _dense_activation(layer: Layer, config: dict[str, Any]) -> str:
    name = _activation_name(config.get("activation", "linear"))
    if name not in DENSE_ACTIVATIONS:
        raise ModelError(f"layer {layer.name!r}: activation {name!r} is not supported "
                         f"(supported: {', '.join(DENSE_ACTIVATIONS)})")
    return name


def _activation_name(value: Any) -> str:
    """``"tanh"``, or a Keras 3 serialised function ``{"class_name": "function", "config": ...}``."""
    if isinstance(value, dict):
        value = value.get("config", value.get("registered_name"))
    if not isinstance(value, str):
        return repr(value)
    return value.split(">")[-1]  # a registered name is "package>name"


def _check_recurrent(name: str, cls: str, config: dict[str, Any], keras3: bool) -> tuple[bool, CellVariant]:
    """Refuse what cannot be served exactly; return whether it claims cuDNN's layout, and its
    variant.

    A ``CuDNNGRU`` / ``CuDNNLSTM`` is always cuDNN's equations. A ``GRU`` config from Keras
    <= 2.1 has no ``reset_after`` key: that Keras had only the reset-before form, so a missing
    key means False.
    """
    if cls not in RECURRENT_CLASSES:
        raise ModelError(f"layer {name!r}: {cls} is not supported (only CuDNNGRU, GRU, CuDNNLSTM "
                         "and LSTM)")
    cell, claims = RECURRENT_CLASSES[cls]
    problems = []
    if not config.get("return_sequences", False):
        problems.append("return_sequences=False (per-step outputs need the whole sequence)")
    if config.get("return_state") or config.get("stateful"):
        problems.append("return_state/stateful")
    if config.get("time_major"):
        problems.append("time_major=True")
    variant: CellVariant = CUDNN if cell == "GRU" else CUDNN_LSTM
    if not claims:
        activations = {role: _gru_activation(config.get(role, default), keras3, role, problems)
                       for role, default in (("recurrent_activation", "hard_sigmoid"),
                                             ("activation", "tanh"))}
        variant = GRUVariant(bool(config.get("reset_after", False)), **activations) if cell == "GRU" \
            else LSTMVariant(**activations)
        if config.get("use_bias", True) is False:
            problems.append("use_bias=False")
    if problems:
        raise ModelError(f"layer {name!r} ({cls}): unsupported " + "; ".join(problems))
    return claims, variant


def _gru_activation(value: Any, keras3: bool, role: str, problems: list[str]) -> str:
    """The spec's name for a GRU or LSTM activation; ``hard_sigmoid`` is always Keras 2's formula."""
    name = _activation_name(value)
    if name == KERAS2_HARD_SIGMOID:
        return "hard_sigmoid"
    if name == "hard_sigmoid" and keras3:
        problems.append(f"{role}='hard_sigmoid' of Keras 3 (relu6(x + 3) / 6, not Keras 2's "
                        "clip(0.2 x + 0.5, 0, 1))")
    elif name not in GRU_ACTIVATIONS:
        problems.append(f"{role}={name!r} (supported: {', '.join(GRU_ACTIVATIONS)})")
    return name


class _GraphWalker:
    """Linearises a Functional model's graph from its single output back to its input."""

    def __init__(self, body: dict[str, Any], directions: dict[str, str], keras3: bool) -> None:
        self.keras3 = keras3
        self.layers = {layer.name: layer for layer in map(self._functional_layer, body.get("layers", []))}
        self.directions = directions
        outputs = body.get("output_layers", [])
        if not outputs:
            raise ModelError("model_config: the model has no output")
        # [[name, 0, 0], ...], or Keras 3's one output as a bare [name, 0, 0]
        self.output = outputs[0] if isinstance(outputs[0], str) else outputs[0][0]

    @staticmethod
    def _functional_layer(entry: dict[str, Any]) -> Layer:
        nodes = entry.get("inbound_nodes", [])
        if len(nodes) > 1:
            raise ModelError(
                f"layer {entry.get('name')!r}: shared layers (called more than once) are not supported")
        try:
            inbound = tuple(_inbound_names(nodes[0])) if nodes else ()
        except (TypeError, IndexError, KeyError) as exc:
            raise ModelError(f"layer {entry.get('name')!r}: unreadable inbound_nodes") from exc
        return _layer(entry, inbound)

    def steps(self, output: str | None = None) -> list[Step]:
        """The plan of everything that feeds ``output`` (default: the model's output)."""
        chain: list[Layer] = []
        name: str | None = output or self.output
        while name is not None:
            layer = self._get(name)
            chain.append(layer)
            if layer.class_name in MERGE_LAYERS:
                name = None
            elif len(layer.inbound) > 1:
                raise ModelError(f"layer {name!r}: {layer.class_name} with several inputs is not supported")
            else:
                name = layer.inbound[0] if layer.inbound else None
        steps: list[Step] = []
        for layer in reversed(chain):
            if layer.class_name in MERGE_LAYERS:
                steps.extend(self._manual_pair(layer))
            else:
                _append(steps, layer, self.keras3)
        return steps

    def _get(self, name: str) -> Layer:
        if name not in self.layers:
            raise ModelError(f"model_config: layer {name!r} is referenced but not defined")
        return self.layers[name]

    def _manual_pair(self, merge: Layer) -> list[Step]:
        """Two branches from one source, each a GRU or LSTM, the backward one between reversals."""
        if len(merge.inbound) != 2:
            raise ModelError(f"layer {merge.name!r}: expected exactly two inputs (forward and backward)")
        if merge.class_name == "Concatenate" and merge.config.get("axis", -1) not in (-1, 2):
            raise ModelError(f"layer {merge.name!r}: concatenation on axis {merge.config.get('axis')} "
                             "is not a per-step merge")
        branches = [self._branch(name) for name in merge.inbound]
        sources = {branch.source for branch in branches}
        if len(sources) != 1:
            raise ModelError(
                f"layer {merge.name!r}: its two recurrent branches start from different layers {sources}")
        directions = [self._direction(branch) for branch in branches]
        if sorted(directions) != ["backward", "forward"]:
            raise ModelError(
                f"layer {merge.name!r}: cannot tell which of {[b.gru.name for b in branches]} runs "
                f"backward (graph says {directions}); name them in the architecture file's "
                '"directions", e.g. {"<layer>": "forward", "<layer>": "backward"}'
            )
        forward, backward = (branches if directions[0] == "forward" else branches[::-1])
        merge_mode = MERGE_LAYERS[merge.class_name]
        if merge_mode == "concat" and directions[0] != "forward":
            raise ModelError(f"layer {merge.name!r}: concatenates backward before forward; not supported")
        claims, variant = _check_recurrent(forward.gru.name, forward.gru.class_name, forward.gru.config,
                                     self.keras3)
        backward_claims, backward_variant = _check_recurrent(
            backward.gru.name, backward.gru.class_name, backward.gru.config, self.keras3)
        if (claims, variant) != (backward_claims, backward_variant):
            raise ModelError(f"layer {merge.name!r}: its forward and backward layers are different "
                             f"kinds ({forward.gru.class_name} {variant}, "
                             f"{backward.gru.class_name} {backward_variant})")
        steps = self.steps(forward.source)
        steps.append(RecurrentStep(forward.gru.name, merge_mode, backward.gru.name, claims, variant))
        return steps

    def _branch(self, tail: str) -> _Branch:
        """Walk back from a merge input over Lambdas and one GRU or LSTM to the shared source."""
        reversals_after, reversals_before, opaque, gru = 0, 0, 0, None
        name = tail
        while True:
            layer = self._get(name)
            if layer.class_name == "Lambda":
                if not _reverses(layer):
                    opaque += 1
                elif gru is None:
                    reversals_after += 1
                else:
                    reversals_before += 1
            elif layer.class_name in RECURRENT_CLASSES and gru is None:
                gru = layer
            else:
                break
            if len(layer.inbound) != 1:
                raise ModelError(f"layer {name!r}: expected one input inside a recurrent branch")
            name = layer.inbound[0]
        if gru is None:
            raise ModelError(f"merge input {tail!r}: no GRU or LSTM layer on this branch")
        return _Branch(gru, name, reversals_before, reversals_after, opaque)

    def _direction(self, branch: _Branch) -> str:
        if branch.gru.name in self.directions:
            return self.directions[branch.gru.name]
        if branch.opaque_lambdas:
            return "unknown"
        before = branch.reversals_before + int(bool(branch.gru.config.get("go_backwards")))
        if before == 1 and branch.reversals_after == 1:
            return "backward"
        if before == 0 and branch.reversals_after == 0:
            return "forward"
        return "unknown"


def _inbound_names(node: Any) -> list[str]:
    """Layer names feeding a node: Keras 2 ``[[name, 0, 0, {}], ...]``, or Keras 3
    ``{"args": [...keras tensors...], "kwargs": {...}}`` (kwargs such as ``mask`` are not data)."""
    if isinstance(node, dict):
        return [name for arg in node.get("args", []) for name in _keras3_tensors(arg)]
    return [tensor[0] for tensor in node]


def _keras3_tensors(value: Any) -> list[str]:
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        return [value["config"]["keras_history"][0]]
    if isinstance(value, list):
        return [name for item in value for name in _keras3_tensors(item)]
    return []


@dataclass(frozen=True)
class _Branch:
    gru: Layer
    source: str
    reversals_before: int
    reversals_after: int
    opaque_lambdas: int


def _reverses(layer: Layer) -> bool:
    """Whether the Lambda's marshalled code names ``reverse`` (read as bytes, never run)."""
    function = layer.config.get("function")
    encoded = function[0] if isinstance(function, list) and function else function
    if not isinstance(encoded, str):
        return False
    try:
        code = base64.b64decode(encoded.encode("ascii"), validate=False)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return b"reverse" in code
