"""Benchmark, in one run on this machine: our service over HTTP and our engines in-process
against the strongest peer, XLA-compiled Keras written by hand and run in-process.

- Latency: one sequence of 16, 64, 256 and 2048 tokens (``MAX_LEN``), p50 / p99; over HTTP
  driven by ``wrk`` with one connection, a fresh body each request; and sporadic, each
  request a random while (10 ms on average) after the last answer (in process alike), as a
  quiet service gets them.
- Throughput: one sequence per request, lengths uniform in 8..256, ``wrk`` with 1, 8, 32 and
  64 connections; the in-process contenders get the same lengths as sorted batches of 32.
- Where the time goes (``bench/breakdown.py``): a lone request at each latency length phase
  by phase, in process; under 32 connections, the server's CPU and interpreter-lock time
  per request. ``--breakdown-only`` runs just that (under a minute) and puts it into the
  last results.
- Ratios to XLA Keras, the H100 anchor of ``models/segmenter/provenance.json``, the service's
  start-up to ready and its engine choice, the floor of a bare uvicorn answer, and
  ``model.predict`` as a footnote.

Writes ``bench/results/latest.{json,md}`` and ``bench.png``; ``--readme`` also pastes the
tables into docs/benchmark.md. Loopback only; every load run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import httpx
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from app.spec import ModelSpec
from bench import breakdown, grpc_latency, report
from bench.arithmetic import flops_per_token, peak_gflops
from bench.inprocess import bench_engine, bench_xla_keras, latency_stats, sporadic_gaps, sporadic_repeats_for
from bench.loadgen import Connection, client_collector_quiet
from bench.server import HOST, PORT, RESULTS, ROOT, start_bare_uvicorn, start_server, stop, wrk

LENGTHS = (16, 64, 256, 2048)
CONNECTIONS = (1, 8, 32, 64)
MIXED = (8, 256)
ENGINES = ("native", "onnxruntime", "openvino")


def workload(spec: ModelSpec, rng: np.random.Generator,
             quick: bool) -> tuple[dict[int, list[np.ndarray]], list[np.ndarray]]:
    """A few sequences per latency length, and 256 sequences of mixed lengths."""
    low, high = spec.input.id_range  # type: ignore[union-attr]  # the default model takes tokens

    def draw(n: int) -> np.ndarray:
        return rng.integers(max(low, 2), high, n).astype(np.int32)

    singles = {n: [draw(n) for _ in range(8)] for n in LENGTHS}
    mixed = [draw(int(n)) for n in rng.integers(MIXED[0], MIXED[1] + 1, 128 if quick else 256)]
    return singles, mixed


def bench_http(id_range: tuple[int, int], quick: bool) -> dict:
    latency_s, load_s = (1, 2) if quick else (4, 8)
    process, seconds_to_ready = start_server()
    try:
        model = httpx.get(f"http://{HOST}:{PORT}/v1/model", timeout=10).json()
        with client_collector_quiet():
            new_lengths = first_requests_at_new_lengths(id_range, max(LENGTHS), 3 if quick else 9)
        latency = {n: wrk(1, latency_s if n < 2048 else 2 * latency_s, (n, n), id_range, seed=n,
                          server_pid=process.pid) for n in LENGTHS}
        with client_collector_quiet():
            sporadic = asyncio.run(sporadic_requests(id_range, quick))
        throughput = {c: wrk(c, load_s, MIXED, id_range, seed=c, server_pid=process.pid)
                      for c in CONNECTIONS}
    finally:
        stop(process)
    for row in latency.values():
        row["p99_over_p50"] = row["p99_ms"] / row["p50_ms"]
    return {"latency": latency, "sporadic": sporadic, "throughput": throughput,
            "seconds_to_ready": seconds_to_ready,
            "service_seconds_to_ready": model["status"]["seconds_to_ready"],
            "engine": model["engine"], "engine_choice": model.get("engine_choice"),
            "self_check": model["self_check"], "new_lengths": new_lengths}


async def sporadic_requests(id_range: tuple[int, int], quick: bool) -> dict:
    """One sequence at a time over one kept-alive connection, each a random while after the
    last answer (:func:`~bench.inprocess.sporadic_gaps`; wrk sends the next at once): per
    length, p50 and p99."""
    rng = np.random.default_rng(2)
    connection = await Connection.open(HOST, PORT)
    rows = {}
    try:
        for n in LENGTHS:
            requests = [connection.encode_post("/infer", json.dumps(
                {"sequences": [rng.integers(*id_range, n).tolist()]}).encode()) for _ in range(8)]
            for request in requests[:3]:
                await connection.send(request)
            samples = []
            repeats = sporadic_repeats_for(n, quick)
            for i, gap in enumerate(sporadic_gaps(repeats, n)):
                await asyncio.sleep(gap)
                seconds, status, _ = await connection.send(requests[i % len(requests)])
                if status != 200:
                    raise RuntimeError(f"/infer answered {status}")
                samples.append(seconds)
            rows[n] = latency_stats(samples)
    finally:
        await connection.close()
    return rows


def first_requests_at_new_lengths(id_range: tuple[int, int], max_len: int, repeats: int) -> dict:
    """No compile on the request path: the first request at each of 16 lengths the service has
    not seen (1..MAX_LEN, log-spaced), against the median of the requests that follow it."""
    rng = np.random.default_rng(1)
    lengths = sorted({int(n) for n in np.geomspace(1, max_len, 16)} - set(LENGTHS) - {max_len})
    rows = {}
    with httpx.Client(base_url=f"http://{HOST}:{PORT}", timeout=30) as client:
        for _ in range(3):  # the connection and the first request's one-off costs, at a length not swept
            client.post("/infer", json={"sequences": [[id_range[0]] * LENGTHS[0]]}).raise_for_status()
        for n in lengths:
            samples = []
            for _ in range(1 + repeats):
                body = {"sequences": [rng.integers(*id_range, n).tolist()]}
                start = time.perf_counter()
                client.post("/infer", json=body).raise_for_status()
                samples.append(1000 * (time.perf_counter() - start))
            steady = float(np.median(samples[1:]))
            rows[n] = {"first_ms": samples[0], "p50_ms": steady, "first_over_p50": samples[0] / steady}
    return rows


def bench_bare(id_range: tuple[int, int], quick: bool) -> dict:
    process = start_bare_uvicorn()
    try:
        seconds = 1 if quick else 4
        return {"latency_64": wrk(1, seconds, (64, 64), id_range, server_pid=process.pid),
                "throughput_32": wrk(32, seconds, MIXED, id_range, server_pid=process.pid)}
    finally:
        stop(process)


def available(kind: str) -> bool:
    from importlib.util import find_spec

    return find_spec("app.engine._recurrence" if kind == "native" else kind) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test, not a measurement")
    parser.add_argument("--readme", action="store_true", help="paste the tables into docs/benchmark.md")
    parser.add_argument("--breakdown-only", action="store_true",
                        help="only where the time goes (under a minute), merged into the last results")
    args = parser.parse_args()

    from app.formats.bundle import load_bundle

    bundle = load_bundle(ROOT / "models" / "segmenter")
    spec = bundle.spec
    singles, mixed = workload(spec, np.random.default_rng(0), args.quick)
    low, high = spec.input.id_range  # type: ignore[union-attr]
    id_range = (max(2, low), high)
    load_before = os.getloadavg()
    if args.breakdown_only:
        write(only_breakdown(id_range, args.quick), args.readme)
        return
    results = {"machine": report.machine(), "load_average_before": load_before}
    results["http"] = bench_http(id_range, args.quick)  # first: no TensorFlow in this process yet
    results["breakdown"] = breakdown.run(id_range, args.quick)
    results["grpc"] = grpc_latency.run(args.quick)
    results["bare_uvicorn"] = bench_bare(id_range, args.quick)
    workers = os.cpu_count() or 1
    results["engines"] = {kind: bench_engine(kind, spec, singles, mixed, max(LENGTHS), workers, args.quick)
                          for kind in ENGINES if available(kind)}
    results["xla_keras"] = bench_xla_keras(spec, singles, mixed, args.quick)
    results["arithmetic"] = {"flops_per_token": flops_per_token(spec), "peak_gflops_per_core": peak_gflops(),
                             "cores": workers, "mixed_mean_tokens": float(np.mean([len(s) for s in mixed]))}
    results["load_average_after"] = os.getloadavg()
    results["h100"] = json.loads((ROOT / "models" / "segmenter" / "provenance.json").read_text())[
        "gpu_inference_anchor"]
    results["quick"] = args.quick
    write(results, args.readme)


def only_breakdown(id_range: tuple[int, int], quick: bool) -> dict:
    """The last full results (when there are some) with a new breakdown in them."""
    latest = RESULTS / "latest.json"
    results = json.loads(latest.read_text()) if latest.exists() else {}
    results["breakdown"] = breakdown.run(id_range, quick)
    results["breakdown"]["machine"] = report.machine()
    return results


def write(results: dict, readme: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    full = "http" in results  # else only a breakdown, without earlier results to merge it into
    markdown = report.markdown(results) if full else report.breakdown_markdown(results["breakdown"])
    (RESULTS / "latest.md").write_text(markdown + "\n")
    if full:
        report.plot(results, RESULTS / "bench.png")
    if readme and full:
        report.paste_into(markdown, report.PAGE)
    print(markdown)
    print(f"\nwrote latest.json, latest.md and bench.png in {RESULTS}"
          + ("; pasted the tables into docs/benchmark.md" if readme and full else ""))


if __name__ == "__main__":
    main()
