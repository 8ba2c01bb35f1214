"""Command line: ``python -m app serve | inspect | convert | verify | export`` (or ``bigru-serve ...``)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.errors import ModelError
from app.formats import ModelBundle, ParityData, load_bundle, parity_inputs_key, read_parity, write_parity
from app.formats.manifest import MANIFEST_NAME, Parity
from app.runtime.selfcheck import DEFAULT_TOLERANCE, SelfCheck, run_self_check


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
    """What the file holds, before any interpretation: attributes and (name, shape, dtype)."""
    if path.is_dir():
        return {"manifest": (path / MANIFEST_NAME).read_text()}, []
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as file:
            rows = [[key, tuple(file.get_slice(key).get_shape()), file.get_slice(key).get_dtype()]
                    for key in file.keys()]  # noqa: SIM118 - safe_open is not a dict
        return {"format": "safetensors"}, rows
    if suffix == ".keras":
        import io

        import h5py

        with zipfile.ZipFile(path) as archive:
            attrs = {"metadata": archive.read("metadata.json").decode()}
            with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as file:
                return attrs, _h5_rows(file)
    if suffix in (".h5", ".hdf5"):
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

    reader = tf.train.load_checkpoint(str(path))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    return {"format": "TF checkpoint"}, [[k, tuple(shapes[k]), dtypes[k].name] for k in sorted(shapes)]


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
    rows += [[layer["name"], f"GRU({layer['units']})",
              f"{'bidirectional' if layer['bidirectional'] else 'forward'}; " + gru_variant_text(layer),
              layer["merge_mode"] or ""] for layer in arch["recurrent"]]
    rows += [[dense["name"], f"Dense({dense['units']})", dense["activation"], ""] for dense in arch["dense"]]
    print()
    print_table(["layer", "kind", "direction / variant / activation", "merge"], rows)


def gru_variant_text(layer: dict) -> str:
    """e.g. ``reset_after=False, hard_sigmoid (Keras 2) / tanh``."""
    recurrent = layer["recurrent_activation"]
    if recurrent == "hard_sigmoid":
        recurrent += " (Keras 2: clip(0.2x+0.5, 0, 1))"
    return f"reset_after={layer['reset_after']}, {recurrent} / {layer['activation']}"


# --- convert / verify / export ---------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with step(f"reading {args.source}"):
        bundle = load_bundle(Path(args.source))
    out.mkdir(parents=True, exist_ok=True)
    with step("building the Keras 3 model and saving model.keras"):
        from app.convert.keras_model import build_keras_model

        build_keras_model(bundle.spec).save(out / "model.keras")
    spec = bundle.spec
    manifest: dict[str, object] = {
        "name": spec.name, "artifact": "model.keras",
        "converted_from": {"path": spec.source.path, "format": spec.source.format,
                           "conversion": spec.source.conversion,
                           "keras_version": spec.source.keras_version},
    }
    if bundle.parity is not None:
        write_parity(out / "parity.npz", bundle.parity)
        manifest["parity"] = {"file": "parity.npz", "ids": parity_inputs_key(bundle.parity),
                              "hidden": "hidden" if bundle.parity.hidden else None,
                              "tolerance": bundle.parity.tolerance}
    if bundle.vocabulary is not None:
        (out / "vocab.json").write_text(json.dumps(bundle.vocabulary, ensure_ascii=False))
        manifest["vocabulary"] = "vocab.json"
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return verify(load_bundle(out), None, args.engine, None)


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
    tolerance = tolerance or parity.tolerance or DEFAULT_TOLERANCE
    with step(f"running {len(parity.sequences)} sequences on {engine}"):
        check = _run_check(bundle, parity, engine, tolerance)
    print_table(["output", "max abs diff", "tolerance", "result"],
                [[name, f"{diff:.3g}", f"{tolerance:g}", "ok" if diff <= tolerance else "FAIL"]
                 for name, diff in (("outputs", check.max_abs_diff_outputs),
                                    ("hidden", check.max_abs_diff_hidden)) if diff is not None])
    return 0 if check.passed else 1


def _run_check(bundle: ModelBundle, parity: ParityData, engine: str, tolerance: float) -> SelfCheck:
    from app.runtime.buckets import length_buckets
    from app.runtime.engines import make_engine
    from app.runtime.runner import Runner

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

    convert = commands.add_parser("convert", help="write a ready model directory (Keras 3 .keras, "
                                  "parity data, vocabulary) and verify it")
    convert.add_argument("source", help="model file or directory")
    convert.add_argument("--out", required=True, help="the directory to write")
    convert.add_argument("--engine", choices=("onnxruntime", "keras"), default="onnxruntime")
    convert.set_defaults(run=cmd_convert)

    verify_cmd = commands.add_parser("verify", help="run the parity check; print max diff per output")
    verify_cmd.add_argument("model", help="model directory or file")
    verify_cmd.add_argument("--reference", help=".npz with ids, lengths and expected outputs")
    verify_cmd.add_argument("--inputs-key", default="ids",
                            help="array of concatenated inputs: ids (N,) or features (N, F)")
    verify_cmd.add_argument("--outputs-key", default="outputs", help="array of expected outputs")
    verify_cmd.add_argument("--hidden-key", default=None, help="array of expected hidden states")
    verify_cmd.add_argument("--tolerance", type=float, default=None)
    verify_cmd.add_argument("--engine", choices=("onnxruntime", "keras"), default="onnxruntime")
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
