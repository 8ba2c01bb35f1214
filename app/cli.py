"""Command line: ``python -m app serve | inspect | convert | verify | export`` (or ``bigru-serve ...``)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from app.convert.child import OnStep
from app.convert.directory import KERAS_FILE
from app.engine.engines import ENGINE_KINDS
from app.engine.selfcheck import SelfCheck, run_self_check, tolerance_for
from app.errors import ModelError
from app.formats.bundle import FileKind, ModelBundle, file_kind, load_bundle
from app.formats.manifest import MANIFEST_NAME, Parity
from app.formats.parity import ParityData, read_parity


@contextmanager
def step(message: str) -> Iterator[None]:
    """Progress for a long step, on stderr so stdout stays clean for results."""
    print(f"... {message}", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f" done ({time.perf_counter() - start:.2f} s)", file=sys.stderr)


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


# --- inspect -------------------------------------------------------------------------

def raw_contents(path: Path) -> tuple[dict[str, object], list[list[object]]]:
    """What the file holds, before any interpretation: attributes and (name, shape, dtype).
    Its kind is the one the readers dispatch on (:func:`app.formats.bundle.file_kind`)."""
    if path.is_dir():
        return {"manifest": (path / MANIFEST_NAME).read_text()}, []
    kind = file_kind(path)
    if kind is FileKind.SAFETENSORS:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as file:
            rows = [[key, tuple(file.get_slice(key).get_shape()), file.get_slice(key).get_dtype()]
                    for key in file.keys()]  # noqa: SIM118 - safe_open is not a dict
        return {"format": kind.value}, rows
    if kind is FileKind.KERAS3:
        import io

        import h5py

        with zipfile.ZipFile(path) as archive:
            attrs = {"metadata": archive.read("metadata.json").decode()}
            with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as file:
                return attrs, _h5_rows(file)
    if kind is FileKind.KERAS_H5:
        import h5py

        with h5py.File(path, "r") as file:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in file.attrs.items()
                     if k not in ("model_config", "training_config")}
            if "model_config" in file.attrs:
                body = json.loads(file.attrs["model_config"])["config"]
                layers = body if isinstance(body, list) else body["layers"]
                attrs["model_config"] = " -> ".join(
                    f"{layer['class_name']}({layer.get('name') or layer['config'].get('name')})"
                    for layer in layers)
            return attrs, _h5_rows(file)
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(path.with_suffix("") if path.suffix == ".index" else path))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    return {"format": kind.value}, [[k, tuple(shapes[k]), dtypes[k].name] for k in sorted(shapes)]


def _h5_rows(file) -> list[list[object]]:
    import h5py

    rows: list[list[object]] = []
    file.visititems(lambda name, obj: rows.append([name, obj.shape, str(obj.dtype)])
                    if isinstance(obj, h5py.Dataset) else None)
    return rows


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        attrs, rows = raw_contents(path)
    except Exception as exc:  # report any unreadable file, whatever the reader raised
        print(f"{path}: unreadable: {exc}", file=sys.stderr)
        return 1
    print(f"file: {path}")
    for key, value in attrs.items():
        print(f"{key}: {value}")
    if rows:
        print()
        print_table(["tensor", "shape", "dtype"], rows)
    print()
    try:
        bundle = load_bundle(path)
    except ModelError as exc:
        print(f"servable: no: {exc}")
        return 1
    describe_bundle(bundle)
    return 0


def describe_bundle(bundle: ModelBundle) -> None:
    spec = bundle.spec
    print(f"servable: yes, as {spec.source.format}; conversion: {spec.source.conversion}")
    if spec.source.keras_version:
        print(f"keras_version: {spec.source.keras_version}")
    arch = spec.describe()
    given = arch["input"]
    if given["kind"] == "tokens":
        rows = [["embedding", f"tokens: {given['vocab_size']} x {given['width']}",
                 "mask_zero" if given["mask_zero"] else "", ""]]
    else:
        masking = "" if given["mask_value"] is None else f"Masking({given['mask_value']:g})"
        rows = [["input", f"features: {given['features']} per step", masking, ""]]
    rows += [[layer["name"], f"{layer['type']}({layer['units']})",
              f"{'bidirectional' if layer['bidirectional'] else 'forward'}; " + variant_text(layer),
              layer["merge_mode"] or ""] for layer in arch["recurrent"]]
    rows += [[dense["name"], f"Dense({dense['units']})", dense["activation"], ""] for dense in arch["dense"]]
    print()
    print_table(["layer", "kind", "direction / variant / activation", "merge"], rows)


def variant_text(layer: dict) -> str:
    """e.g. ``reset_after=False, hard_sigmoid (Keras 2) / tanh`` (an LSTM has no reset_after)."""
    recurrent = layer["recurrent_activation"]
    if recurrent == "hard_sigmoid":
        recurrent += " (Keras 2: clip(0.2x+0.5, 0, 1))"
    reset_after = f"reset_after={layer['reset_after']}, " if "reset_after" in layer else ""
    return f"{reset_after}{recurrent} / {layer['activation']}"


# --- convert / verify / export ---------------------------------------------------------

class TextProgress:
    """``convert``'s steps for people, on stderr."""

    def step(self, name: str, message: str) -> AbstractContextManager[None]:
        return step(message)


def cmd_convert(args: argparse.Namespace) -> int:
    from app.config import get_settings

    settings = get_settings()
    if args.out is None and args.source is None and settings.model_repository is not None:
        return _convert_repository(settings.model_repository)
    source = Path(args.source) if args.source else settings.model_path
    if args.out is None:
        print(_convert_into_cache(source, _progress("")))
        return 0
    out = Path(args.out)
    if args.progress == "json":
        return _convert_for_parent(source, out)
    from app.convert.pipeline import convert_model

    conversion = convert_model(source, out, TextProgress(), args.tolerance)
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))}) in "
          f"{conversion.seconds:.1f} s, peak RSS {conversion.peak_rss_mib:.0f} MiB")
    check = conversion.keras_check
    if check is None:
        print("no parity data: the Keras model's outputs on probe sequences are recorded for the "
              "serving engine's check")
        return 0
    print(f"Keras ({KERAS_FILE} loaded back in safe mode) against {check.reference}:")
    print_check(check)
    return 0 if check.passed else 1


def _convert_for_parent(source: Path, out: Path) -> int:
    """The child of a start-up conversion: JSON events on stdout (see app.convert.child)."""
    from app.convert.child import JsonProgress, die_with_parent
    from app.convert.pipeline import convert_model

    die_with_parent()
    try:
        conversion = convert_model(source, out, JsonProgress())
    except ModelError as exc:
        JsonProgress.emit({"event": "error", "message": str(exc)})
        return 3
    JsonProgress.emit({"event": "done", "seconds": round(conversion.seconds, 3),
                       "peak_rss_mib": round(conversion.peak_rss_mib, 1)})
    return 0


def _progress(label: str) -> OnStep:
    """A conversion's steps on stderr, each line naming what converts."""
    def on_step(_: str, message: str) -> None:
        print(f"... {label}{message}", file=sys.stderr, flush=True)

    return on_step


def _convert_into_cache(source: Path, on_step: OnStep) -> str:
    """What the service does at start-up: find or make the conversion in MODEL_CACHE_DIR
    (an init container or a one-shot job runs this before the servers start); says how."""
    from app.config import get_settings
    from app.convert.cache import resolve

    settings = get_settings()
    resolved = resolve(source, settings.model_cache_dir, settings.convert_timeout_s, on_step)
    details = ", ".join(f"{k} {v}" for k, v in resolved.conversion.items())
    return f"{resolved.how}: {resolved.directory}" + (f" ({details})" if details else "")


def _convert_repository(root: Path) -> int:
    """Every version of every model in MODEL_REPOSITORY into the cache, one after another; the
    ones that fail are named at the end (a failure never stops the others)."""
    from app.service.layout import scan

    try:
        models = scan(root)
    except FileNotFoundError as exc:
        print(f"error: MODEL_REPOSITORY: {exc}", file=sys.stderr)
        return 1
    failed, tried = [], 0
    for name, model in models.items():
        for number, version in sorted(model.versions.items()):
            label, tried = f"{name}/{number}", tried + 1
            problem = model.problem or version.problem
            try:
                if problem is not None or version.model is None:
                    raise ModelError(problem or "no model")
                print(f"{label}: {_convert_into_cache(version.model, _progress(label + ': '))}", flush=True)
            except (ModelError, OSError) as exc:  # reported, and the next version is tried
                print(f"{label}: failed: {exc}", flush=True)
                failed.append(label)
    if failed:
        print(f"error: {len(failed)} of {tried} versions failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"{tried} versions of {len(models)} models in the cache" if tried else
          f"{root}: no model versions yet", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    bundle = load_bundle(Path(args.model))
    reference = None
    if args.reference:
        ref = Path(args.reference)
        reference = read_parity(ref.parent, Parity(file=ref.name, ids=args.inputs_key,
                                                   outputs=args.outputs_key, hidden=args.hidden_key))
    return verify(bundle, reference, args.engine, args.tolerance)


def verify(bundle: ModelBundle, reference: ParityData | None, engine: str, tolerance: float | None) -> int:
    parity = reference or bundle.parity
    if parity is None:
        print("no parity data: pass --reference FILE.npz (ids or features, lengths, outputs[, hidden])",
              file=sys.stderr)
        return 2
    tolerance = tolerance_for(tolerance, parity)
    with step(f"running {len(parity.sequences)} sequences on {engine}"):
        check = _run_check(bundle, parity, engine, tolerance)
    print_check(check)
    return 0 if check.passed else 1


def print_check(check: SelfCheck) -> None:
    print_table(["output", "max abs diff", "tolerance", "result"],
                [[name, f"{diff:.3g}", f"{check.tolerance:g}", "ok" if diff <= check.tolerance else "FAIL"]
                 for name, diff in (("outputs", check.max_abs_diff_outputs),
                                    ("hidden", check.max_abs_diff_hidden)) if diff is not None])


def _run_check(bundle: ModelBundle, parity: ParityData, engine: str, tolerance: float) -> SelfCheck:
    from app.engine.buckets import length_buckets
    from app.engine.engines import make_engine
    from app.engine.runner import Runner

    buckets = length_buckets(max(len(s) for s in parity.sequences))
    runner = Runner(make_engine(engine, bundle.spec, None, buckets), buckets, 32)
    return run_self_check(parity, runner.run, tolerance)


def cmd_export(args: argparse.Namespace) -> int:
    from app.lowering.exports import export

    bundle = load_bundle(Path(args.model))
    out = Path(args.out or f"{bundle.spec.name}.{args.format}")
    if out.exists() and args.format == "savedmodel":
        shutil.rmtree(out)
    with step(f"exporting {args.format}"):
        written = export(bundle.spec, args.format, out)
    print(f"wrote {written}")
    return 0


def cmd_serve(_: argparse.Namespace) -> int:
    from app.server import run

    run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (settings from the environment: "
                                "MODEL_PATH, HOST, PORT, ...; see the README)")
    serve.set_defaults(run=cmd_serve)

    inspect = commands.add_parser("inspect", help="what a model file holds, and whether it can be served")
    inspect.add_argument("file", help="a .h5, .keras, .safetensors, TF checkpoint prefix, or model directory")
    inspect.set_defaults(run=cmd_inspect)

    convert = commands.add_parser(
        "convert", help="convert into a Keras 3 model, saved by Keras and checked by Keras against "
        "the parity data; with --out, write that ready model directory; without, put it in "
        "MODEL_CACHE_DIR as the service does at start-up (for init containers)")
    convert.add_argument("source", nargs="?", help="model file or directory (default: MODEL_PATH)")
    convert.add_argument("--out", help="the directory to write (default: the cache entry)")
    convert.add_argument("--tolerance", type=float, default=None,
                         help="for the Keras check (default: the model's, else 1e-4)")
    convert.add_argument("--progress", choices=("text", "json"), default="text", help=argparse.SUPPRESS)
    convert.set_defaults(run=cmd_convert)

    verify_cmd = commands.add_parser("verify", help="run the parity check; print max diff per output")
    verify_cmd.add_argument("model", help="model directory or file")
    verify_cmd.add_argument("--reference", help=".npz with ids, lengths and expected outputs")
    verify_cmd.add_argument("--inputs-key", default="ids",
                            help="array of concatenated inputs: ids (N,) or features (N, F)")
    verify_cmd.add_argument("--outputs-key", default="outputs", help="array of expected outputs")
    verify_cmd.add_argument("--hidden-key", default=None, help="array of expected hidden states")
    verify_cmd.add_argument("--tolerance", type=float, default=None)
    verify_cmd.add_argument("--engine", choices=ENGINE_KINDS, default="onnxruntime")
    verify_cmd.set_defaults(run=cmd_verify)

    export_cmd = commands.add_parser("export", help="the converted weights for other runtimes")
    export_cmd.add_argument("model", help="model directory or file")
    export_cmd.add_argument("--format", required=True, choices=("savedmodel", "onnx", "npz"))
    export_cmd.add_argument("--out", help="output path (default: <name>.<format>)")
    export_cmd.set_defaults(run=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
