"""Runs ``python -m app serve`` and reports every file the Python process opens for writing
outside /tmp (as a JSON line on stderr), via an audit hook: a read-only root filesystem with
a writable /tmp, as in the container, must be enough."""

from __future__ import annotations

import json
import os
import sys

WRITABLE = ("/tmp/", "/dev/", "/proc/")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def report_writes(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
        return
    path, mode, flags = os.fsdecode(args[0]), args[1], args[2] or 0
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & WRITE_FLAGS
    if writing and not (os.path.abspath(path) + "/").startswith(WRITABLE):
        sys.stderr.write(json.dumps({"write_outside_tmp": path}) + "\n")


if __name__ == "__main__":
    sys.addaudithook(report_writes)
    from app.server import run

    run()
