"""One run of the service's image under podman, as our deployment files run it: read-only root,
a tmpfs on /tmp, the memory limit the Kubernetes manifest declares, on a free loopback port."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
PODMAN = str(HERE / "podman")
MANIFEST = HERE.parent.parent / "deploy" / "kubernetes" / "deployment.yaml"
# usage now, peak usage, and the file whose "oom_kill N" line counts OOM kills
CGROUP_V1_FILES = {"current": "memory.usage_in_bytes", "peak": "memory.max_usage_in_bytes",
                   "events": "memory.oom_control"}
CGROUP_V2_FILES = {"current": "memory.current", "peak": "memory.peak", "events": "memory.events"}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def declared_memory_limit_mib() -> int:
    """The Kubernetes manifest's memory limit, in MiB."""
    manifest = yaml.safe_load(MANIFEST.read_text())
    limit = manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), f"{MANIFEST}: expected a limit in Mi, got {limit}"
    return int(limit.removesuffix("Mi"))


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Container:
    """A detached `podman run` of the image; a context manager that removes it on exit."""

    def __init__(self, image: str, memory: str | None = None, env: dict[str, str] | None = None) -> None:
        self.name = f"bigru-image-test-{secrets.token_hex(4)}"
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cgroup: tuple[Path, dict[str, str]] | None = None
        memory = memory or f"{declared_memory_limit_mib()}m"  # podman's m is MiB
        self.started = time.monotonic()
        settings = [f"--env={key}={value}" for key, value in (env or {}).items()]
        # --memory-swap = --memory: no swap on top of the limit, as on Kubernetes.
        podman("run", "--detach", "--name", self.name, "--read-only", "--tmpfs", "/tmp",
               "--memory", memory, "--memory-swap", memory,
               "--publish", f"127.0.0.1:{self.port}:8000", *settings, image)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def wait_until_ready(self, timeout: float = 120) -> float:
        """Seconds from `podman run` to /readyz 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise RuntimeError(f"{self.name} exited: {self.state()}\n{self.logs()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.logs()}")

    def state(self) -> dict:
        """podman's State: Running, ExitCode, OOMKilled, ..."""
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def memory(self) -> dict[str, int]:
        """The container's cgroup memory now and at its peak (bytes), and its OOM kills so far
        (podman's OOMKilled flag misses them on cgroup v1 hosts). Only while it runs."""
        if self._cgroup is None:
            path = podman("inspect", "--format", "{{.State.CgroupPath}}", self.name).stdout.strip()
            v1 = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            self._cgroup = ((v1, CGROUP_V1_FILES) if v1.is_dir() else
                            (Path("/sys/fs/cgroup") / path.lstrip("/"), CGROUP_V2_FILES))
        folder, files = self._cgroup
        counters = dict(line.split() for line in (folder / files["events"]).read_text().splitlines())
        figures = {"current": int((folder / files["current"]).read_text()),
                   "oom_kills": int(counters["oom_kill"])}
        if (folder / files["peak"]).exists():  # v2's memory.peak: Linux 5.19+
            figures["peak"] = int((folder / files["peak"]).read_text())
        return figures

    @contextmanager
    def watching_memory(self, every_s: float = 0.05) -> Iterator[dict[str, int]]:
        """Samples memory() while the block runs; the dict holds the last sample taken, so it
        still tells the peak (and an OOM kill, when caught) if the container dies meanwhile."""
        last = self.memory()
        done = threading.Event()

        def sample() -> None:
            while not done.wait(every_s):
                try:
                    last.update(self.memory())
                except OSError:  # the cgroup went away with the container
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield last
        finally:
            done.set()
            sampler.join()

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, check=False)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def stop(self, timeout: int = 30) -> subprocess.Popen:
        """Send SIGTERM (then SIGKILL after ``timeout``); returns the running `podman stop`."""
        return subprocess.Popen([PODMAN, "stop", "--time", str(timeout), self.name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)
