"""File formats in, one :class:`~app.spec.ModelSpec` out.

:func:`load_bundle` takes ``MODEL_PATH``: a model directory with a ``model.json``
(artifact, architecture hints, GPU parity data, vocabulary), or a single model file that
describes itself (a full-model Keras ``.h5``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.errors import ModelError
from app.formats.manifest import MANIFEST_NAME, Architecture, KerasRecord, Parity, read_manifest
from app.spec import ModelSpec


@dataclass(frozen=True)
class ParityData:
    """Sequences and the per-step outputs the GPU gave for them."""

    file: str
    sequences: list[np.ndarray]
    outputs: list[np.ndarray]
    hidden: list[np.ndarray] | None
    tolerance: float | None


@dataclass(frozen=True)
class ModelBundle:
    spec: ModelSpec
    parity: ParityData | None
    vocabulary: list[str] | None
    converted_from: dict[str, str | None] | None = None
    keras: KerasRecord | None = None  # a directory written by `convert`: Keras' own check
    keras_outputs: ParityData | None = None  # ... and the Keras model's outputs on its sequences


def read_spec(path: Path, architecture: Architecture, name: str) -> ModelSpec:
    """Dispatch on the file's kind; each reader converts to the Keras 3 layout."""
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5", ".keras2"):
        from app.formats.keras_h5 import read_keras_h5

        return read_keras_h5(path, architecture, name)
    if suffix == ".keras":
        from app.formats.keras3 import read_keras3

        return read_keras3(path, architecture, name)
    if suffix == ".safetensors":
        from app.formats.torch_safetensors import read_torch_safetensors

        return read_torch_safetensors(path, architecture, name)
    from app.formats.tf1_checkpoint import is_checkpoint, read_tf1_checkpoint

    if is_checkpoint(path):
        return read_tf1_checkpoint(path, architecture, name)
    raise ModelError(f"{path}: unsupported model file type {suffix!r} "
                     "(supported: .h5, .keras, .safetensors, a TF checkpoint prefix)")


def load_bundle(path: Path) -> ModelBundle:
    path = Path(path)
    if path.is_dir():
        manifest = read_manifest(path)
        name = manifest.name or path.name
        spec = read_spec(path / manifest.artifact, manifest.architecture, name)
        parity = read_parity(path, manifest.parity) if manifest.parity else None
        vocabulary = read_vocabulary(path / manifest.vocabulary) if manifest.vocabulary else None
        if vocabulary is not None and len(vocabulary) != spec.vocab_size:
            rows = "no embedding" if spec.vocab_size is None else f"{spec.vocab_size} rows"
            raise ModelError(f"{path / str(manifest.vocabulary)}: {len(vocabulary)} tokens, "
                             f"but the embedding has {rows}")
        keras_outputs = read_parity(path, manifest.keras.outputs) if manifest.keras else None
        return ModelBundle(spec, parity, vocabulary, manifest.converted_from, manifest.keras, keras_outputs)
    if not path.exists() and not Path(f"{path}.index").exists():
        raise ModelError(f"{path}: no such model file or directory")
    return ModelBundle(read_spec(path, Architecture(), path.stem), None, None)


def read_parity(directory: Path, parity: Parity) -> ParityData:
    """An ``.npz`` with the concatenated inputs (``ids (N,)`` integers, or ``features (N, F)``
    floats: the array named by ``parity.ids``) and per-step arrays, split by ``lengths``."""
    path = directory / parity.file
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in (parity.ids, parity.lengths, parity.outputs,
                                                  parity.hidden) if key is not None}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable parity file: {exc}") from exc
    except KeyError as exc:
        raise ModelError(f"{path}: parity file lacks array {exc}") from exc
    lengths = arrays[parity.lengths].astype(np.int64)
    cuts = np.cumsum(lengths)[:-1]

    def split(key: str) -> list[np.ndarray]:
        array = arrays[key]
        if array.shape[0] != lengths.sum():
            raise ModelError(f"{path}: {key} has {array.shape[0]} rows, lengths sum to {lengths.sum()}")
        return np.split(array, cuts)

    inputs = split(parity.ids)
    dtype = np.int32 if np.issubdtype(arrays[parity.ids].dtype, np.integer) else np.float32
    return ParityData(
        file=str(path),
        sequences=[s.astype(dtype) for s in inputs],
        outputs=split(parity.outputs),
        hidden=split(parity.hidden) if parity.hidden else None,
        tolerance=parity.tolerance,
    )


def parity_inputs_key(parity: ParityData) -> str:
    """What :func:`write_parity` calls the inputs: ``ids``, or ``features`` for float vectors."""
    return "features" if parity.sequences[0].ndim == 2 else "ids"


def write_parity(path: Path, parity: ParityData) -> Path:
    """The canonical parity file: ``ids`` (or ``features``), ``lengths``, ``outputs`` (and
    ``hidden``)."""
    arrays = {parity_inputs_key(parity): np.concatenate(parity.sequences),
              "lengths": np.array([len(s) for s in parity.sequences], np.int32),
              "outputs": np.concatenate(parity.outputs)}
    if parity.hidden is not None:
        arrays["hidden"] = np.concatenate(parity.hidden)
    np.savez(path, **arrays)
    return path


def read_vocabulary(path: Path) -> list[str]:
    """A JSON list of token strings, indexed by id."""
    try:
        tokens = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable vocabulary: {exc}") from exc
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ModelError(f"{path}: the vocabulary must be a JSON list of strings")
    return tokens


__all__ = ["MANIFEST_NAME", "ModelBundle", "ParityData", "load_bundle", "read_spec"]
