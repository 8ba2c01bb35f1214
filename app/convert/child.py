"""The conversion in a child process: ``python -m app convert SOURCE --out DIR --progress json``.

TensorFlow and Keras live only in the child; when it ends, their memory goes back to the
system and the serving process never maps ``libtensorflow``. The child reports on stdout,
one JSON object per line::

    {"event": "step", "step": "reading" | "building" | "keras-check" | "writing", "message": ...}
    {"event": "done", "seconds": ..., "peak_rss_mib": ...}
    {"event": "error", "message": "<file>: <the problem>"}

Its stderr (TensorFlow's own chatter) is kept, and its last lines explain a child that died
without a word (killed for memory, say).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import app
from app.errors import ModelError

OnStep = Callable[[str, str], None]
PARENT_PID = "BIGRU_CONVERT_PARENT_PID"
_running: set[subprocess.Popen] = set()  # conversions in flight in this process


class JsonProgress:
    """The child's side: steps, the result or the error, as JSON lines on stdout."""

    @contextmanager
    def step(self, name: str, message: str) -> Iterator[None]:
        self.emit({"event": "step", "step": name, "message": message})
        yield

    @staticmethod
    def emit(event: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def convert_in_child(source: Path, out: Path, on_step: OnStep, timeout_s: float) -> dict[str, object]:
    """Run the conversion in a child and follow it; returns its ``done`` event.

    Raises :class:`ModelError` with the child's own message (which names the file and the
    problem), or with how it died and the end of its stderr."""
    command = [sys.executable, "-m", "app", "convert", str(source), "--out", str(out), "--progress", "json"]
    timed_out = threading.Event()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_child_env()) as child:
        _running.add(child)
        stderr_tail: deque[str] = deque(maxlen=15)
        reader = threading.Thread(target=stderr_tail.extend, args=(child.stderr,), daemon=True)
        reader.start()
        timer = threading.Timer(timeout_s, lambda: (timed_out.set(), child.kill()))
        timer.start()
        try:
            events = _events(child.stdout, on_step)
            child.wait()
        finally:
            timer.cancel()
            _running.discard(child)
        reader.join(timeout=5)
    if "error" in events:
        raise ModelError(str(events["error"]["message"]))
    if child.returncode == 0 and "done" in events:
        return {key: value for key, value in events["done"].items() if key != "event"}
    tail = "".join(stderr_tail).strip()
    ended = (f"took longer than CONVERT_TIMEOUT_S={timeout_s:g} s and was stopped" if timed_out.is_set()
             else _how_it_ended(child.returncode))
    raise ModelError(f"{source}: the conversion {ended}" + (f"; its last words: {tail}" if tail else ""))


def _events(stdout: Iterator[str] | None, on_step: OnStep) -> dict[str, dict]:
    """Pass steps on as they come; keep the final ``done`` or ``error`` event."""
    final: dict[str, dict] = {}
    for line in stdout or ():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a library printing to stdout: not ours
        if event.get("event") == "step":
            on_step(event["step"], event["message"])
        elif event.get("event") in ("done", "error"):
            final[event["event"]] = event
    return final


def _how_it_ended(returncode: int) -> str:
    if returncode == -signal.SIGKILL:
        return "was killed (SIGKILL: out of memory? it needs more than the serving process)"
    if returncode < 0:
        return f"was killed by signal {signal.Signals(-returncode).name}"
    return f"exited with status {returncode} without a result"


def stop_conversions() -> None:
    """Kill the conversions running now (the server is shutting down)."""
    for child in list(_running):
        child.kill()


def die_with_parent() -> None:
    """In the child: get SIGKILL when the server that started it dies, however it dies, so
    that no orphaned conversion outlives it (Linux ``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != int(os.environ.get(PARENT_PID, os.getppid())):
        os._exit(1)  # the parent died before the line above: nobody is waiting for us


def _child_env() -> dict[str, str]:
    """The parent's environment, with this very ``app`` package first on the path."""
    root = str(Path(app.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""),
            PARENT_PID: str(os.getpid()), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
