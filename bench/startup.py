"""Start-up, measured: time to ready and memory of each phase, cold (empty conversion cache:
the Keras conversion runs in a child process) and warm (cache hit: no conversion).

Memory is read from ``/proc``: the serving process's and the conversion child's peak RSS
(``VmHWM``), the child's largest anonymous part (``RssAnon``; the rest is mapped library
files, which a container's memory limit can evict), and the largest sum of both processes'
RSS seen while they ran side by side (sampled every 20 ms). Writes
``bench/results/startup.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import httpx

from bench.server import HOST, PORT, RESULTS, ROOT

SAMPLE_S = 0.02


def kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/PID/status`` in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Children of any of the process's threads (the conversion starts from a worker thread)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def start(cache: Path) -> dict[str, float]:
    env = {**os.environ, "MODEL_CACHE_DIR": str(cache), "HOST": HOST, "PORT": str(PORT),
           "PYTHONPATH": str(ROOT), "DRAIN_DELAY_S": "0"}
    begin = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child_peak = child_anon = together = 0
    try:
        while True:
            kids = children(server.pid)
            child_peak = max([child_peak] + [kib(k, "VmHWM") for k in kids])
            child_anon = max([child_anon] + [kib(k, "RssAnon") for k in kids])
            together = max(together, kib(server.pid, "VmRSS") + sum(kib(k, "VmRSS") for k in kids))
            try:
                if httpx.get(f"http://{HOST}:{PORT}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.perf_counter() - begin > 600:
                raise RuntimeError("the service did not become ready")
            time.sleep(SAMPLE_S)
        ready_s = time.perf_counter() - begin
        meta = httpx.get(f"http://{HOST}:{PORT}/v1/model").json()
        return {"time_to_ready_s": round(ready_s, 2),
                "service_seconds_to_ready": round(meta["status"]["seconds_to_ready"], 2),
                "how": meta["keras"]["conversion"]["how"],
                "conversion_child_peak_rss_mib": round(child_peak / 1024, 1),
                "conversion_child_peak_anonymous_mib": round(child_anon / 1024, 1),
                "conversion_recorded_peak_rss_mib": meta["keras"]["conversion"].get("peak_rss_mib"),
                "serving_peak_rss_mib": round(kib(server.pid, "VmHWM") / 1024, 1),
                "serving_rss_when_ready_mib": round(kib(server.pid, "VmRSS") / 1024, 1),
                "serving_anonymous_when_ready_mib": round(kib(server.pid, "RssAnon") / 1024, 1),
                "largest_sum_of_both_mib": round(together / 1024, 1)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bigru-startup-") as cache:
        report = {"cold": start(Path(cache)), "warm": start(Path(cache))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
