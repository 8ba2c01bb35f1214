"""The converted model directory that ``python -m app convert`` writes and the service serves.

::

    model.json         manifest: name, artifact, converted_from, keras (Keras' own check), parity
    model.keras        the Keras 3 model, saved by Keras
    parity.npz         the source's parity data (GPU outputs), when it has some
    keras_outputs.npz  the Keras model's own outputs on the check sequences
    vocab.json         the vocabulary, when the source has one
    integrity.json     sha256 of every file above, written last

The integrity record is what tells a complete, intact directory from a half-written or
corrupted one. Reading it needs no Keras: this module is used by the serving process.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from app.errors import ModelError
from app.formats.manifest import MANIFEST_NAME

KERAS_FILE = "model.keras"
PARITY_FILE = "parity.npz"
KERAS_OUTPUTS_FILE = "keras_outputs.npz"
VOCABULARY_FILE = "vocab.json"
INTEGRITY_FILE = "integrity.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_integrity(directory: Path) -> None:
    """Record the sha256 of every file; the record itself appears atomically, last."""
    files = {path.name: file_sha256(path) for path in sorted(directory.iterdir())
             if path.is_file() and path.name != INTEGRITY_FILE}
    partial = directory / f".{INTEGRITY_FILE}.partial"
    partial.write_text(json.dumps({"files": files}, indent=2))
    os.replace(partial, directory / INTEGRITY_FILE)


def verify_integrity(directory: Path) -> None:
    """Raise :class:`ModelError` naming the first missing or altered file."""
    record = directory / INTEGRITY_FILE
    try:
        files: dict[str, str] = json.loads(record.read_text())["files"]
    except FileNotFoundError:
        raise ModelError(f"{record}: missing (an incomplete conversion?)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{record}: unreadable integrity record: {exc}") from exc
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ModelError(f"{path}: missing (listed in {INTEGRITY_FILE})")
        if file_sha256(path) != expected:
            raise ModelError(f"{path}: sha256 differs from {INTEGRITY_FILE} (corrupted)")
    if KERAS_FILE not in files or MANIFEST_NAME not in files:
        raise ModelError(f"{record}: does not list {KERAS_FILE} and {MANIFEST_NAME}")


def is_converted(directory: Path) -> bool:
    """Whether ``directory`` was written by ``convert`` (an integrity record and a Keras record)."""
    if not (directory / INTEGRITY_FILE).is_file():
        return False
    try:
        return "keras" in json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
