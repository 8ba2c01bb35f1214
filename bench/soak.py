"""Bounded soak: mixed traffic on loopback for SOAK_SECONDS (default 600), watching RSS.

Valid requests of mixed sizes (1..2048 tokens, 1..8 sequences, some asking for hidden
states) and some invalid ones go to a service started here. It passes with zero unexpected
answers (every valid request 200, every invalid one 4xx) and RSS growth under 5% from the
end of the first tenth of the run (allocators and caches settle) to the end.
Writes ``bench/results/soak.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import numpy as np

from bench.loadgen import Connection
from bench.server import HOST, PORT, RESULTS, rss_bytes, start_server

CLIENTS = 8
INVALID = [b'{"sequences": [[1, 999]]}', b'{"sequences": []}', b"not json", b'{"sequences": [["a"]]}']


def valid_body(rng: np.random.Generator) -> bytes:
    count = int(rng.integers(1, 9))
    lengths = np.minimum(rng.geometric(1 / 120, count), 2048)  # mostly short, sometimes long
    sequences = [rng.integers(2, 96, int(n)).tolist() for n in lengths]
    return json.dumps({"sequences": sequences, "return_hidden": bool(rng.random() < 0.1)}).encode()


async def client(seconds: float, seed: int, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(seed)
    conn = await Connection.open(HOST, PORT)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        invalid = rng.random() < 0.05
        body = INVALID[int(rng.integers(len(INVALID)))] if invalid else valid_body(rng)
        try:
            _, status, _ = await conn.send(conn.encode_post("/infer", body))
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            counts["transport_errors"] += 1
            conn = await Connection.open(HOST, PORT)
            continue
        expected = 400 <= status < 500 if invalid else status == 200
        counts["requests"] += 1
        counts["unexpected"] += 0 if expected else 1
        counts[f"status_{status}"] = counts.get(f"status_{status}", 0) + 1
    await conn.close()


async def soak(seconds: float, pid: int) -> dict:
    counts = {"requests": 0, "unexpected": 0, "transport_errors": 0}
    samples: list[tuple[float, int]] = []
    start = time.monotonic()

    async def sample() -> None:
        while time.monotonic() - start < seconds:
            samples.append((time.monotonic() - start, rss_bytes(pid)))
            await asyncio.sleep(5)

    await asyncio.gather(sample(), *[client(seconds, seed, counts) for seed in range(CLIENTS)])
    settled = [rss for t, rss in samples if t >= seconds / 10] or [samples[-1][1]]
    return {**counts, "seconds": seconds, "clients": CLIENTS,
            "rss_start_mib": settled[0] / 2**20, "rss_end_mib": settled[-1] / 2**20,
            "rss_max_mib": max(rss for _, rss in samples) / 2**20,
            "rss_growth_pct": 100 * (settled[-1] - settled[0]) / settled[0],
            "rss_samples_mib": [round(rss / 2**20, 1) for _, rss in samples]}


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    process, _ = start_server()
    try:
        report = asyncio.run(soak(seconds, process.pid))
    finally:
        process.terminate()
        process.wait(timeout=30)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=2))
    ok = report["unexpected"] == 0 and report["transport_errors"] == 0 and report["rss_growth_pct"] < 5
    print(f"soak {seconds:.0f} s, {CLIENTS} clients: {report['requests']} requests, "
          f"{report['unexpected']} unexpected answers, {report['transport_errors']} transport errors; "
          f"RSS {report['rss_start_mib']:.1f} -> {report['rss_end_mib']:.1f} MiB "
          f"({report['rss_growth_pct']:+.2f}%, max {report['rss_max_mib']:.1f} MiB): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
