"""One conversion: source file -> Keras 3 model, saved by Keras, checked by Keras, written out.

This is ``python -m app convert SOURCE --out DIR``, which the service also runs in a child
process at start-up (:mod:`app.convert.child`), so that TensorFlow's memory is given back
when it ends. Steps:

1. read the source into a :class:`~app.spec.ModelSpec` (TF 1.x checkpoints need TensorFlow);
2. build the Keras 3 model (:mod:`app.lowering.keras_model`) and save it as ``model.keras``;
3. load ``model.keras`` back with Keras (safe mode) and run it on the parity sequences (or on
   probe sequences when the source has none); compare with the parity data (GPU outputs);
4. write the directory of :mod:`app.convert.directory`: the Keras model's own outputs (which
   the serving engine must reproduce), its check, the parity data, the vocabulary, and last
   the integrity record.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.convert.directory import (
    KERAS_FILE,
    KERAS_OUTPUTS_FILE,
    PARITY_FILE,
    VOCABULARY_FILE,
    is_converted,
    write_integrity,
)
from app.engine.selfcheck import SelfCheck, run_self_check, tolerance_for
from app.errors import ModelError
from app.formats.bundle import ModelBundle, load_bundle
from app.formats.manifest import MANIFEST_NAME
from app.formats.parity import ParityData, write_parity

KERAS_OUTPUTS_TOLERANCE = 1e-5  # serving engine vs the Keras model: same float32 equations


class Progress(Protocol):
    def step(self, name: str, message: str) -> AbstractContextManager[None]:
        """Announce a step (``name`` for machines, ``message`` for people) around its work."""
        ...


@dataclass(frozen=True)
class Conversion:
    out: Path
    keras_check: SelfCheck | None  # None: the source has no parity data
    seconds: float
    peak_rss_mib: float


def convert_model(source: Path, out: Path, progress: Progress, tolerance: float | None = None) -> Conversion:
    start = time.perf_counter()
    with progress.step("reading", f"reading {source}"):
        bundle = load_bundle(source)
    _empty_directory(out)
    with progress.step("building", f"building the Keras 3 model and saving {KERAS_FILE}"):
        import keras

        from app.lowering.keras_model import build_keras_model

        build_keras_model(bundle.spec).save(out / KERAS_FILE)
    with progress.step("keras-check", f"running {KERAS_FILE}, loaded back by Keras, on the check sequences"):
        from app.convert.keras_check import probe_sequences, run_saved_model

        sequences = bundle.parity.sequences if bundle.parity else probe_sequences(bundle.spec)
        results = run_saved_model(out / KERAS_FILE, bundle.spec.input, sequences)
        check = None if bundle.parity is None else run_self_check(
            bundle.parity, lambda _: results, tolerance_for(tolerance, bundle.parity))
    with progress.step("writing", f"writing {out}"):
        keras_outputs = ParityData(str(out / KERAS_OUTPUTS_FILE), sequences, [o for o, _ in results],
                                   [h for _, h in results], KERAS_OUTPUTS_TOLERANCE)
        write_parity(out / KERAS_OUTPUTS_FILE, keras_outputs)
        conversion = Conversion(out, check, time.perf_counter() - start, peak_rss_mib())
        manifest = _manifest(bundle, keras.__version__, conversion)
        if bundle.parity is not None:
            write_parity(out / PARITY_FILE, bundle.parity)
        if bundle.vocabulary is not None:
            (out / VOCABULARY_FILE).write_text(json.dumps(bundle.vocabulary, ensure_ascii=False))
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        write_integrity(out)
    return conversion


def _manifest(bundle: ModelBundle, keras_version: str, conversion: Conversion) -> dict[str, object]:
    spec, check = bundle.spec, conversion.keras_check
    inputs_key = spec.input.name  # what write_parity calls the inputs: ids or features
    manifest: dict[str, object] = {
        "name": spec.name,
        "artifact": KERAS_FILE,
        "converted_from": {"path": spec.source.path, "format": spec.source.format,
                           "conversion": spec.source.conversion, "keras_version": spec.source.keras_version},
        "keras": {
            "keras_version": keras_version,
            "check": None if check is None else {
                "sequences": check.sequences, "max_abs_diff_outputs": check.max_abs_diff_outputs,
                "max_abs_diff_hidden": check.max_abs_diff_hidden, "reference": check.reference},
            "outputs": {"file": KERAS_OUTPUTS_FILE, "ids": inputs_key, "hidden": "hidden",
                        "tolerance": KERAS_OUTPUTS_TOLERANCE},
            "conversion": {"seconds": round(conversion.seconds, 3),
                           "peak_rss_mib": round(conversion.peak_rss_mib, 1)},
        },
    }
    if bundle.parity is not None:
        manifest["parity"] = {"file": PARITY_FILE, "ids": inputs_key,
                              "hidden": "hidden" if bundle.parity.hidden else None,
                              "tolerance": bundle.parity.tolerance}
    if bundle.vocabulary is not None:
        manifest["vocabulary"] = VOCABULARY_FILE
    return manifest


def _empty_directory(out: Path) -> None:
    """``out``, new or empty; a previous conversion there is replaced, anything else refused."""
    if out.is_dir() and any(out.iterdir()):
        if not is_converted(out):
            raise ModelError(f"{out}: not empty and not written by convert; give a new or empty directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
