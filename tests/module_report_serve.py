"""Runs ``python -m app serve`` and reports on stderr, as one JSON line each, the first import
of TensorFlow, Keras and (as a control that the hook works) ONNX Runtime, via an audit hook."""

from __future__ import annotations

import json
import sys

WATCHED = ("tensorflow", "keras", "tf_keras", "onnxruntime")


def report_imports(event: str, args: tuple) -> None:
    if event == "import" and args[0] in WATCHED:
        sys.stderr.write(json.dumps({"imported": args[0]}) + "\n")


if __name__ == "__main__":
    sys.addaudithook(report_imports)
    from app.server import run

    run()
