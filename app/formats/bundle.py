"""A model as the service takes it (``MODEL_PATH``): a directory with a ``model.json``
(artifact, architecture hints, GPU parity data, vocabulary), or a single model file that
describes itself (a full-model Keras ``.h5``). Its model file is read by the reader of its kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from app.errors import ModelError
from app.formats.manifest import Architecture, KerasRecord, read_manifest
from app.formats.parity import ParityData, read_parity
from app.formats.vocabulary import read_vocabulary
from app.spec import ModelSpec


@dataclass(frozen=True)
class ModelBundle:
    spec: ModelSpec
    parity: ParityData | None
    vocabulary: list[str] | None
    converted_from: dict[str, str | None] | None = None
    keras: KerasRecord | None = None  # a directory written by `convert`: Keras' own check
    keras_outputs: ParityData | None = None  # ... and the Keras model's outputs on its sequences


class FileKind(StrEnum):
    """The kinds of model file the readers take."""

    KERAS_H5 = "Keras HDF5"
    KERAS3 = "Keras 3 archive"
    SAFETENSORS = "safetensors"
    TF_CHECKPOINT = "TF checkpoint"


SUFFIXES = {".h5": FileKind.KERAS_H5, ".hdf5": FileKind.KERAS_H5, ".keras2": FileKind.KERAS_H5,
            ".keras": FileKind.KERAS3, ".safetensors": FileKind.SAFETENSORS}


def file_kind(path: Path) -> FileKind:
    """The kind of ``path``, by its suffix, else a TF checkpoint prefix (or its ``.index``)."""
    from app.formats.tf1_checkpoint import is_checkpoint

    kind = SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        return kind
    if is_checkpoint(path):
        return FileKind.TF_CHECKPOINT
    raise ModelError(f"{path}: unsupported model file type {path.suffix.lower()!r} "
                     f"(supported: {', '.join(SUFFIXES)}, a TF checkpoint prefix)")


def read_spec(path: Path, architecture: Architecture, name: str) -> ModelSpec:
    """Dispatch on the file's kind; each reader converts to the Keras 3 layout."""
    kind = file_kind(path)
    if kind is FileKind.KERAS_H5:
        from app.formats.keras_h5 import read_keras_h5

        return read_keras_h5(path, architecture, name)
    if kind is FileKind.KERAS3:
        from app.formats.keras3 import read_keras3

        return read_keras3(path, architecture, name)
    if kind is FileKind.SAFETENSORS:
        from app.formats.torch_safetensors import read_torch_safetensors

        return read_torch_safetensors(path, architecture, name)
    from app.formats.tf1_checkpoint import read_tf1_checkpoint

    return read_tf1_checkpoint(path, architecture, name)


def served_name(path: Path) -> str:
    """The name a model is served under when ``MODEL_PATH`` names it (as :func:`load_bundle`
    names its spec): its manifest's name, else the directory's or the file's."""
    if path.is_dir():
        try:
            return read_manifest(path).name or path.name
        except ModelError:
            return path.name  # the load reports what is wrong with it
    return path.stem


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
