from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The suite's services (in process and as servers) run the native engine unless a test names
# another: ENGINE=auto times every engine at each start-up (about a second of both cores), and
# under the suite's load it would pick whichever ran luckier. Its choice has tests of its own.
os.environ.setdefault("ENGINE", "native")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEFAULT_MODEL = ROOT / "models" / "segmenter"


# The files whose tests take longest go first: `make test` hands whole files (or test classes)
# to its parallel workers in this order, so that no worker is left alone with one long file
# at the end.
LONGEST_FIRST = ("test_variants.py", "test_startup_conversion.py", "test_production.py", "test_lstm.py",
                 "test_conversion.py", "test_cli.py", "test_engines.py", "test_kserve_limits.py",
                 "test_settings.py", "test_repository.py", "test_repository_api.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MODEL_CACHE_DIR for the session's servers, shared by its xdist workers (the cache
    takes concurrent writers): the default model converts once per run.
    ``TEST_MODEL_CACHE_DIR`` keeps it across sessions (``make mutation`` runs one per mutant)."""
    kept = os.environ.get("TEST_MODEL_CACHE_DIR")
    if kept:
        path = Path(kept)
    elif "PYTEST_XDIST_WORKER" in os.environ:  # the workers' base temps share a parent
        path = tmp_path_factory.getbasetemp().parent / "model-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("model-cache")
    os.environ["MODEL_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def default_converted(conversion_cache: Path) -> Path:
    """The default model's entry in the session's cache: converted once per run (the servers
    of the default model find it there too), for tests that need it converted but not cold."""
    from app.convert.cache import resolve

    return resolve(DEFAULT_MODEL, conversion_cache, 600, lambda step, message: None).directory


def converted_copy(entry: Path, directory: Path, **parity: float | None) -> Path:
    """A copy of a converted directory, its manifest's ``parity`` entries set as given (None
    removes one) and its integrity record written again: served as it is, without a conversion."""
    from app.convert.directory import write_integrity

    shutil.copytree(entry, directory)
    manifest = json.loads((directory / "model.json").read_text())
    for key, value in parity.items():
        manifest["parity"].pop(key, None)
        if value is not None:
            manifest["parity"][key] = value
    (directory / "model.json").write_text(json.dumps(manifest))
    write_integrity(directory)
    return directory


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_log() -> Iterator[list[logging.LogRecord]]:
    """The ``app.access`` log's records during the test, at the level the service logs it."""
    handler, logger = Records(), logging.getLogger("app.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="session")
def legacy_expected() -> dict:
    return json.loads((FIXTURES / "legacy" / "expected.json").read_text())


@pytest.fixture(scope="session")
def gpu_reference() -> dict:
    """The GPU's own outputs for the default model, split per sequence."""
    with np.load(DEFAULT_MODEL / "segmenter.ref.npz") as data:
        arrays = {key: data[key] for key in data.files}
    cuts = np.cumsum(arrays["lengths"])[:-1]
    split = {key: np.split(arrays[key], cuts) for key in
             ("ids", "probs_fp32", "probs_tf32", "hidden_fp32", "probs_padded_nomask")}
    split["lengths"] = arrays["lengths"]
    return split


PORTS_PER_WORKER = 1000
# Each session starts at its own offset: two suites run side by side rarely probe the same port.
_next_port = itertools.count(os.getpid() % PORTS_PER_WORKER)


def free_port() -> int:
    """A loopback port nothing listens on, from a range of this xdist worker's own below the
    kernel's ephemeral ports: parallel workers, and the ports the kernel hands out meanwhile,
    never take the one just probed."""
    import socket

    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    start = 20000 + PORTS_PER_WORKER * (worker % 12)
    for _ in range(PORTS_PER_WORKER):
        port = start + next(_next_port) % PORTS_PER_WORKER
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or a closed connection's TIME_WAIT
            return port
    raise RuntimeError(f"no free loopback port in {start}..{start + PORTS_PER_WORKER - 1}")


class Server:
    """A real uvicorn process on a free loopback port."""

    def __init__(self, env: dict[str, str] | None = None, serve: bool = False,
                 argv: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> None:
        """``serve``: run ``python -m app serve`` (draining shutdown) instead of plain uvicorn;
        ``argv``: run these Python arguments instead (a wrapper around the service);
        ``prefix``: a command that runs the Python process (a tracer)."""
        import subprocess
        import sys
        import threading

        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"  # the Open Inference Protocol's gRPC
        command = list(argv) or (["-m", "app", "serve"] if serve else
                                 ["-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--no-access-log"])
        self.process = subprocess.Popen(
            [*prefix, sys.executable, *command],
            cwd=ROOT, env={**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
                          "GRPC_PORT": str(self.grpc_port), **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: stop() leaves nothing of it running
        )
        self.prefixed = bool(prefix)
        # Read the log as it comes: a full pipe would block the server.
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.append(line)

    def wait_until(self, path: str = "/readyz", status: int = 200, timeout: float = 60) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} never answered {status}:\n{self.stop()}")

    def output(self) -> str:
        """Everything the server logged so far (all of it, once it has exited)."""
        if self.process.poll() is not None:
            self._reader.join(timeout=10)
        return "".join(self._lines)

    def log_records(self) -> list[dict]:
        """The JSON log lines so far, parsed."""
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def records(self, message_prefix: str) -> list[dict]:
        """The JSON log records whose message starts with ``message_prefix``."""
        return [r for r in self.log_records() if str(r.get("message", "")).startswith(message_prefix)]

    def metric(self, sample: str, default: float | None = None) -> float:
        """One sample of ``/metrics``, named as exposed (labels included); ``default`` when
        it is absent, else its absence fails the test."""
        import httpx

        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        if default is None:
            raise AssertionError(f"no {sample} in /metrics")
        return default

    def stop(self) -> str:
        """SIGTERM to the server (under a prefix: to what the prefix runs, so that a tracer
        records the shutdown too and is not left detached from a server that runs on), then,
        past 20 s, SIGKILL to whatever is left of the process group."""
        import signal
        import time

        if self.process.poll() is None:
            targets = [pid for pid in self._group() if pid != self.process.pid] if self.prefixed else []
            for pid in targets or [self.process.pid]:
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (self.process.poll() is None or self._group()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self._group():
            _signal(pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        return self.output()

    def _group(self) -> list[int]:
        """The live processes of the server's process group."""
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(group) == self.process.pid and state != "Z":
                members.append(int(stat.parent.name))
        return members


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
        os.kill(pid, signum)


@pytest.fixture(scope="session")
def server():
    handle = Server()
    handle.wait_until()
    yield handle
    handle.stop()
