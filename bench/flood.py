"""Flood: far more concurrent work than the service can hold, on loopback.

256 connections each send 8 requests of 4 sequences x 256 tokens back to back (about 3x the
default MAX_QUEUE in flight at once). Every answer must be a correct 200 or a fast 503, and
the service must be ready and exact afterwards. Writes ``bench/results/flood.json``.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import numpy as np

from bench.loadgen import Connection
from bench.server import HOST, PORT, RESULTS, ROOT, start_server

CONNECTIONS, REQUESTS_EACH = 256, 8


async def flood() -> list[tuple[float, int]]:
    rng = np.random.default_rng(0)
    connections = [await Connection.open(HOST, PORT) for _ in range(CONNECTIONS)]

    async def client(conn: Connection) -> list[tuple[float, int]]:
        body = json.dumps({"sequences": rng.integers(2, 96, (4, 256)).tolist()}).encode()
        return [(await conn.send(conn.encode_post("/infer", body), timeout=60))[:2]
                for _ in range(REQUESTS_EACH)]

    runs = await asyncio.gather(*[client(c) for c in connections])
    for conn in connections:
        await conn.close()
    return [r for run in runs for r in run]


def parity_after(url: str) -> float:
    with np.load(ROOT / "models" / "segmenter" / "segmenter.ref.npz") as ref:
        cuts = np.cumsum(ref["lengths"])[:-1]
        ids, probs = np.split(ref["ids"], cuts), np.split(ref["probs_fp32"], cuts)
    body = httpx.post(url + "/infer", json={"sequences": [s.tolist() for s in ids]}, timeout=60).json()
    return max(float(np.max(np.abs(np.asarray(o) - p))) for o, p in zip(body["outputs"], probs))


def main() -> int:
    process, _ = start_server()
    url = f"http://{HOST}:{PORT}"
    try:
        results = asyncio.run(flood())
        ready = httpx.get(url + "/readyz").status_code
        diff = parity_after(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
    statuses = [s for _, s in results]
    ms = {code: np.asarray([t for t, s in results if s == code]) * 1000 for code in set(statuses)}
    report = {
        "requests": len(results), "counts": {str(c): statuses.count(c) for c in sorted(set(statuses))},
        "p50_ms": {str(c): float(np.percentile(v, 50)) for c, v in ms.items()},
        "p99_ms": {str(c): float(np.percentile(v, 99)) for c, v in ms.items()},
        "p99_all_ms": float(np.percentile([t for t, _ in results], 99)) * 1000,
        "ready_after": ready, "parity_after_max_abs_diff": diff,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flood.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = set(statuses) <= {200, 503} and ready == 200 and diff <= 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
