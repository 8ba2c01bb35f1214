"""PyTorch ``nn.GRU`` and ``nn.LSTM`` state_dicts saved as safetensors (plain tensors; nothing
is unpickled).

``<rnn>.weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, with the
suffix ``_reverse`` for the backward direction; stacked bidirectional layers concatenate.
``weight_hh (3U, U)`` is an ``nn.GRU``'s, ``(4U, U)`` an ``nn.LSTM``'s. An ``nn.LSTM`` with
``proj_size > 0`` (its ``weight_hr_l{k}`` projects h to fewer units) has no Keras
equivalent and is refused by name; ``batch_first`` changes no weight.
The embedding (``<emb>.weight (V, D)``) and an ``nn.Linear`` head (``<head>.weight (C, H)``)
are found by shape unless ``architecture.tensors`` names them (a Dense stack is named as a list
in order, with ``head_activations``); ``architecture.input = "features"`` says there is no
embedding (the GRU reads feature vectors).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from app.errors import ModelError
from app.formats.gru_layouts import from_torch_gru
from app.formats.layouts import CellRead
from app.formats.lstm_layouts import from_torch_lstm
from app.formats.manifest import Architecture
from app.formats.named_tensors import find_by_shape, pick_one
from app.formats.plan import DenseStep, EmbeddingStep, RecurrentStep, Step, assemble
from app.spec import ModelSpec, Source

GRU_KEY = re.compile(r"^(?P<prefix>.*?)\.?weight_ih_l0$")


def read_torch_safetensors(path: Path, architecture: Architecture, name: str) -> ModelSpec:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: file not found") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file (truncated?): {exc}") from exc
    source = TorchWeights(path, tensors, architecture)
    steps: list[Step] = [] if source.embedding_key is None else [EmbeddingStep(source.embedding_key)]
    merge = "concat" if source.bidirectional else None
    steps += [RecurrentStep(f"{source.gru_prefix}l{k}", merge) for k in range(source.layers)]
    activations = architecture.dense_activations(len(source.head_prefixes), str(path))
    steps += [DenseStep(prefix, act) for prefix, act in zip(source.head_prefixes, activations)]
    return assemble(name, steps, source, Source(str(path), "pytorch-safetensors", "auto"))


class TorchWeights:
    """The :class:`~app.formats.plan.WeightSource` of a PyTorch state_dict."""

    def __init__(self, path: Path, tensors: dict[str, np.ndarray], architecture: Architecture) -> None:
        self.path, self.tensors = path, tensors
        names = architecture.tensors
        self.gru_prefix = self._gru_prefix(names.gru if names else None)
        self.layers = sum(1 for key in tensors if re.fullmatch(
            re.escape(self.gru_prefix) + r"weight_ih_l\d+", key))
        self.bidirectional = f"{self.gru_prefix}weight_ih_l0_reverse" in tensors
        projections = sorted(key for key in tensors if re.fullmatch(
            re.escape(self.gru_prefix) + r"weight_hr_l\d+(_reverse)?", key))
        if projections:
            raise ModelError(f"{path}: {self.gru_prefix}* is an nn.LSTM with proj_size > 0 "
                             f"({projections[0]} projects h to fewer units), which Keras' LSTM has "
                             "no equivalent for; not supported")
        gru_keys = {key for key in tensors if key.startswith(self.gru_prefix)}
        self.embedding_key = None if architecture.input == "features" else \
            self._embedding_key(names.embedding if names else None, gru_keys)
        self.head_prefixes = self._head_prefixes(names.head if names else None,
                                                 gru_keys | {self.embedding_key or ""})

    def _gru_prefix(self, named: str | None) -> str:
        if named is not None:
            prefix = f"{named}." if named else ""
            if f"{prefix}weight_ih_l0" not in self.tensors:
                raise ModelError(f"{self.path}: no tensor {prefix}weight_ih_l0")
            return prefix
        matches = [m["prefix"] for key in self.tensors if (m := GRU_KEY.match(key))]
        if len(matches) != 1:
            raise ModelError(f"{self.path}: expected one nn.GRU or nn.LSTM (a *.weight_ih_l0 tensor), "
                             f"found {len(matches)}; name it in the architecture file's tensors.gru")
        return f"{matches[0]}." if matches[0] else ""

    def _embedding_key(self, named: str | None, exclude: set[str]) -> str:
        if named is not None:
            key = named if named in self.tensors else f"{named}.weight"
            if key not in self.tensors:
                raise ModelError(f"{self.path}: no embedding tensor {key}")
            return key
        width = self.tensors[f"{self.gru_prefix}weight_ih_l0"].shape[1]
        candidates = find_by_shape(self.tensors, exclude, lambda a: a.shape[1] == width)
        return pick_one(candidates, "embedding", str(self.path), "tensors.embedding")

    def _head_prefixes(self, named: str | list[str] | None, exclude: set[str]) -> list[str]:
        """The named Dense layers (a stack is named in order), else the one found by shape."""
        if named is not None:
            prefixes = [named] if isinstance(named, str) else named
            for prefix in prefixes:
                if f"{prefix}.weight" not in self.tensors:
                    raise ModelError(f"{self.path}: no head tensor {prefix}.weight")
            return prefixes
        units = self.tensors[f"{self.gru_prefix}weight_hh_l0"].shape[1]
        hidden = 2 * units if self.bidirectional else units
        candidates = find_by_shape(self.tensors, exclude, lambda a: a.shape[1] == hidden)
        if not candidates:
            return []
        return [pick_one(candidates, "head", str(self.path), "tensors.head").removesuffix(".weight")]

    def embeddings(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def recurrent(self, name: str, direction: str | None, claims_cudnn: bool | None) -> CellRead:
        layer = name.removeprefix(self.gru_prefix)
        suffix = f"_{layer}" + ("_reverse" if direction == "backward" else "")
        get = self.tensors.get
        keys = [f"{self.gru_prefix}{part}{suffix}" for part in
                ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if keys[0] not in self.tensors or keys[1] not in self.tensors:
            raise ModelError(f"{self.path}: missing {keys[0]} or {keys[1]}")
        where = f"{self.path}: {self.gru_prefix}*{suffix}"
        weight_hh = get(keys[1])
        if weight_hh.ndim == 2 and weight_hh.shape[0] == 4 * weight_hh.shape[1]:
            lstm = from_torch_lstm(get(keys[0]), weight_hh, get(keys[2]), get(keys[3]), where)
            return CellRead(lstm, "torch-lstm->keras-lstm", cudnn=True)
        weights = from_torch_gru(get(keys[0]), weight_hh, get(keys[2]), get(keys[3]), where)
        return CellRead(weights, "torch-gru->keras-gru", cudnn=True)  # PyTorch's GRU: reset_after

    def dense(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        # nn.Linear computes x @ weight.T
        return self.tensors[f"{name}.weight"].T, self.tensors.get(f"{name}.bias")
