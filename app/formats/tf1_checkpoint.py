"""TF 1.x ``tf.contrib.cudnn_rnn.CudnnGRU`` and ``CudnnLSTM`` checkpoints, by their canonical
variable names.

Per layer ``i`` and direction, under ``.../cell_{i}/cudnn_compatible_gru_cell/`` (from
``MultiRNNCell``) or ``.../cell_{i}/bidirectional_rnn/{fw,bw}/cudnn_compatible_gru_cell/``
(from ``stack_bidirectional_dynamic_rnn``, which concatenates the directions):
``gates/kernel``, ``gates/bias``, ``candidate/input_projection/{kernel,bias}``,
``candidate/hidden_projection/{kernel,bias}``; an LSTM's are ``kernel`` and ``bias`` under
``.../cudnn_compatible_lstm_cell/`` (TF's i, c, f, o gate order, see
:func:`~app.formats.lstm_layouts.from_tf1_canonical_lstm`). Read with ``tf.train.load_checkpoint``,
which reads tensors and runs nothing. The embedding and a dense head (``<scope>/kernel``,
``<scope>/bias``) are found by shape unless ``architecture.tensors`` names them (a Dense stack
as a list of scopes in order); ``architecture.input = "features"``: no embedding.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from app.errors import ModelError
from app.formats.gru_layouts import from_tf1_canonical
from app.formats.layouts import CellRead
from app.formats.lstm_layouts import from_tf1_canonical_lstm
from app.formats.manifest import Architecture
from app.formats.named_tensors import find_by_shape, pick_one
from app.formats.plan import DenseStep, EmbeddingStep, RecurrentStep, Step, assemble
from app.spec import ModelSpec, Source

CELL = re.compile(r"^(?P<base>.*cell_(?P<index>\d+)/(?:.*/(?P<dir>fw|bw)/)?"
                  r"cudnn_compatible_(?P<cell>gru|lstm)_cell/)(?P<gates>gates/)?kernel$")
CELL_SCOPES = ("cudnn_compatible_gru_cell/", "cudnn_compatible_lstm_cell/")
GRU_PARTS = ("gates/kernel", "gates/bias", "candidate/input_projection/kernel",
             "candidate/input_projection/bias", "candidate/hidden_projection/kernel",
             "candidate/hidden_projection/bias")
OPTIMIZER_STATE = ("Adam", "Momentum", "RMSProp", "Adagrad", "Ftrl", "beta1_power", "beta2_power",
                   "global_step", "ExponentialMovingAverage")


def is_checkpoint(path: Path) -> bool:
    return path.suffix == ".index" or Path(f"{path}.index").exists()


def read_tf1_checkpoint(path: Path, architecture: Architecture, name: str) -> ModelSpec:
    prefix = path.with_suffix("") if path.suffix == ".index" else path
    source = CheckpointWeights(prefix, _read_all(prefix), architecture)
    merge = "concat" if source.bidirectional else None
    steps: list[Step] = [] if source.embedding_key is None else [EmbeddingStep(source.embedding_key)]
    steps += [RecurrentStep(str(index), merge) for index in sorted(source.cells)]
    activations = architecture.dense_activations(len(source.head_scopes), str(prefix))
    steps += [DenseStep(scope, act) for scope, act in zip(source.head_scopes, activations)]
    file_format = f"tf1-cudnn{'+'.join(sorted(source.kinds))}-checkpoint"
    return assemble(name, steps, source, Source(str(prefix), file_format, "auto"))


def _read_all(prefix: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(prefix))
        names = [n for n in reader.get_variable_to_shape_map() if not any(s in n for s in OPTIMIZER_STATE)]
        return {n: np.asarray(reader.get_tensor(n)) for n in names}
    except (tf.errors.OpError, ValueError) as exc:
        raise ModelError(f"{prefix}: not a readable TF checkpoint (truncated?): {exc}") from exc


class CheckpointWeights:
    """The :class:`~app.formats.plan.WeightSource` of a TF 1.x checkpoint."""

    def __init__(self, prefix: Path, tensors: dict[str, np.ndarray], architecture: Architecture) -> None:
        self.prefix, self.tensors = prefix, tensors
        self.cells: dict[int, dict[str | None, str]] = {}
        self.kinds: set[str] = set()  # "gru", "lstm"
        for key in tensors:
            if (match := CELL.match(key)) and (match["cell"] == "gru") == bool(match["gates"]):
                self.cells.setdefault(int(match["index"]), {})[match["dir"]] = match["base"]
                self.kinds.add(match["cell"])
        if not self.cells:
            raise ModelError(f"{prefix}: no cudnn_compatible_gru_cell or cudnn_compatible_lstm_cell "
                             "variables in this checkpoint")
        if sorted(self.cells) != list(range(len(self.cells))):
            raise ModelError(f"{prefix}: recurrent cells {sorted(self.cells)} are not numbered 0..n-1")
        kinds = {frozenset(directions) for directions in self.cells.values()}
        if kinds not in ({frozenset({None})}, {frozenset({"fw", "bw"})}):
            raise ModelError(f"{prefix}: every layer must be unidirectional or every layer fw+bw")
        self.bidirectional = kinds == {frozenset({"fw", "bw"})}
        names = architecture.tensors
        used = {key for key in tensors if any(scope in key for scope in CELL_SCOPES)}
        self.embedding_key = None if architecture.input == "features" else \
            self._embedding_key(names.embedding if names else None, used)
        self.head_scopes = self._head_scopes(names.head if names else None,
                                             used | {self.embedding_key or ""})

    def _base(self, index: int, direction: str | None) -> str:
        if not self.bidirectional:
            return self.cells[index][None]
        return self.cells[index]["bw" if direction == "backward" else "fw"]

    def _embedding_key(self, named: str | None, exclude: set[str]) -> str:
        if named is not None:
            if named not in self.tensors:
                raise ModelError(f"{self.prefix}: no embedding variable {named!r}")
            return named
        width, _ = self._widths(self._base(0, "forward" if self.bidirectional else None))
        candidates = [key for key in find_by_shape(self.tensors, exclude, lambda a: a.shape[1] == width)
                      if not key.endswith("/kernel")]  # a dense layer's, not an embedding
        return pick_one(candidates, "embedding", str(self.prefix), "tensors.embedding")

    def _head_scopes(self, named: str | list[str] | None, exclude: set[str]) -> list[str]:
        """The named Dense scopes (a stack is named in order), else the one found by shape."""
        if named is not None:
            scopes = [named] if isinstance(named, str) else named
            for scope in scopes:
                if f"{scope}/kernel" not in self.tensors:
                    raise ModelError(f"{self.prefix}: no head variable {scope}/kernel")
            return scopes
        _, units = self._widths(self._base(len(self.cells) - 1, "forward" if self.bidirectional else None))
        hidden = 2 * units if self.bidirectional else units
        candidates = [key for key in find_by_shape(self.tensors, exclude, lambda a: a.shape[0] == hidden)
                      if key.endswith("/kernel")]
        if not candidates:
            return []
        return [pick_one(candidates, "head", str(self.prefix), "tensors.head").removesuffix("/kernel")]

    def _widths(self, base: str) -> tuple[int, int]:
        """The cell's input width and units, from its kernel (x and h rows stacked)."""
        if base.endswith(CELL_SCOPES[1]):
            kernel = self.tensors[base + "kernel"]
            units = kernel.shape[1] // 4
        else:
            kernel = self.tensors[base + "gates/kernel"]
            units = self.tensors[base + "candidate/hidden_projection/kernel"].shape[0]
        return kernel.shape[0] - units, units

    def embeddings(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def recurrent(self, name: str, direction: str | None, claims_cudnn: bool | None) -> CellRead:
        base = self._base(int(name), direction)
        lstm = base.endswith(CELL_SCOPES[1])
        parts = ("kernel", "bias") if lstm else GRU_PARTS
        missing = [p for p in parts if base + p not in self.tensors]
        if missing:
            raise ModelError(f"{self.prefix}: {base} lacks {missing}")
        arrays = [self.tensors[base + p] for p in parts]
        if lstm:
            return CellRead(from_tf1_canonical_lstm(*arrays, where=base),
                            "tf1-canonical-lstm->keras-lstm", cudnn=True)
        return CellRead(from_tf1_canonical(*arrays, where=base), "tf1-canonical-gru->keras-gru", cudnn=True)

    def dense(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        return self.tensors[f"{name}/kernel"], self.tensors.get(f"{name}/bias")
