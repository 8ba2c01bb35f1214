"""Benchmark: ``model.predict`` per request vs the engine in-process vs the service over HTTP.

Everything runs on this machine; HTTP traffic goes to 127.0.0.1 only, with bounded request
counts and time-outs. Prints a table, writes ``bench/results/latest.json`` and draws
``bench/results/bench.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LENGTHS = (16, 64, 256, 2048)
CONCURRENCY = (1, 8, 32)
HOST, PORT, GRPC_PORT = "127.0.0.1", 8790, 8791


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "n": len(ms)}


def timed(call, repeats: int, warm: int = 3) -> list[float]:
    for _ in range(warm):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def random_ids(rng: np.random.Generator, length: int, vocab: int) -> np.ndarray:
    return rng.integers(2, vocab, length).astype(np.int32)


def bench_predict(bundle, rng, quick: bool) -> dict:
    """What a user writes by hand: ``model.predict`` once per request."""
    from app.convert.keras_model import build_keras_model

    model = build_keras_model(bundle.spec)
    vocab = bundle.spec.vocab_size

    def predict(ids: np.ndarray) -> None:
        model.predict([ids[None], np.ones((1, len(ids)), bool)], verbose=0)

    latency = {n: percentiles(timed(lambda n=n: predict(random_ids(rng, n, vocab)), 5 if quick else 20))
               for n in LENGTHS if n <= 256}
    lengths = rng.integers(8, 257, 8 if quick else 32)
    start = time.perf_counter()
    for n in lengths:
        predict(random_ids(rng, int(n), vocab))
    throughput = len(lengths) / (time.perf_counter() - start)
    return {"latency": latency, "throughput_seq_s": throughput}


def bench_engine(bundle, rng, quick: bool) -> dict:
    from app.runtime.buckets import length_buckets
    from app.runtime.engines import OnnxRuntimeEngine
    from app.runtime.runner import Runner

    runner = Runner(OnnxRuntimeEngine(bundle.spec), length_buckets(2048), 32)
    vocab = bundle.spec.vocab_size
    latency = {n: percentiles(timed(lambda n=n: runner.run([random_ids(rng, n, vocab)]),
                                    20 if quick else 200 if n < 2048 else 30)) for n in LENGTHS}
    batch = [random_ids(rng, int(n), vocab) for n in rng.integers(8, 257, 32)]
    samples = timed(lambda: runner.run(batch), 3 if quick else 10)
    return {"latency": latency, "batch32_seq_s": 32 / statistics.median(samples)}


async def bench_http(host: str, port: int, vocab: int, rng, quick: bool) -> dict:
    from bench.loadgen import Connection

    def request(conn: Connection, length: int) -> bytes:
        body = json.dumps({"sequences": [random_ids(rng, length, vocab).tolist()]}).encode()
        return conn.encode_post("/infer", body)

    conn = await Connection.open(host, port)
    latency = {}
    for n in LENGTHS:
        repeats = 20 if quick else 200 if n < 2048 else 30
        for _ in range(3):
            await conn.send(request(conn, n))
        latency[n] = percentiles([(await conn.send(request(conn, n)))[0] for _ in range(repeats)])
    await conn.close()

    throughput = {}
    for clients in CONCURRENCY:
        per_client = 10 if quick else max(20, 1280 // clients)
        connections = [await Connection.open(host, port) for _ in range(clients)]
        plans = [[request(c, int(n)) for n in rng.integers(8, 257, per_client)] for c in connections]

        async def client_loop(conn: Connection, plan: list[bytes]) -> list[tuple[float, int]]:
            return [(await conn.send(r))[:2] for r in plan]

        start = time.perf_counter()
        runs = await asyncio.gather(*[client_loop(c, p) for c, p in zip(connections, plans)])
        elapsed = time.perf_counter() - start
        results = [r for run in runs for r in run]
        for conn in connections:
            await conn.close()
        errors = sum(1 for _, status in results if status != 200)
        throughput[clients] = {"seq_s": len(results) / elapsed, "errors": errors,
                               **percentiles([t for t, _ in results])}
    return {"latency": latency, "throughput": throughput}


def start_server():
    import subprocess
    import sys

    import httpx

    # As users run it (python -m app serve), request logging included; the log is discarded.
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"], cwd=ROOT,
        env={**os.environ, "HOST": HOST, "PORT": str(PORT), "GRPC_PORT": str(GRPC_PORT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{PORT}"
    start = time.perf_counter()
    while time.perf_counter() - start < 120:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the service never became ready")


def table(report: dict) -> str:
    """The results as Markdown (printed, and pasted into the README)."""
    predict, engine, http = report["predict"], report["engine"], report["http"]
    lines = [
        f"One sequence, batch 1, p50 / p99 in ms ({report['machine']}):",
        "",
        "| tokens | `model.predict` | engine in-process | service over HTTP | HTTP vs predict (p50) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in LENGTHS:
        base, eng, net = predict["latency"].get(n), engine["latency"][n], http["latency"][n]
        base_text = f"{base['p50_ms']:.1f} / {base['p99_ms']:.1f}" if base else "-"
        speedup = f"{base['p50_ms'] / net['p50_ms']:.0f}x" if base else "-"
        lines.append(f"| {n} | {base_text} | {eng['p50_ms']:.2f} / {eng['p99_ms']:.2f} | "
                     f"{net['p50_ms']:.2f} / {net['p99_ms']:.2f} | {speedup} |")
    lines += [
        "",
        "One sequence per request, lengths uniform in 8..256, over HTTP "
        f"(`model.predict` per request: {predict['throughput_seq_s']:.1f} seq/s):",
        "",
        "| clients | seq/s | p50 ms | p99 ms | errors | vs predict |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for clients, row in http["throughput"].items():
        lines.append(f"| {clients} | {row['seq_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                     f"{row['errors']} | {row['seq_s'] / predict['throughput_seq_s']:.0f}x |")
    lines += ["", f"Engine in-process, one call of 32 mixed sequences: {engine['batch32_seq_s']:.0f} seq/s. "
              f"Service start-up to ready (self-check and warm-up included): "
              f"{http['seconds_to_ready']:.1f} s."]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, key in (("model.predict", "predict"), ("engine in-process", "engine"),
                       ("service over HTTP", "http")):
        rows = report[key]["latency"]
        lengths = [n for n in LENGTHS if n in rows or str(n) in rows]
        left.plot(lengths, [rows[n]["p50_ms"] for n in lengths], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="p50 latency (ms)",
             title="Latency, one sequence")
    left.legend()
    clients = list(report["http"]["throughput"])
    right.bar([str(c) for c in clients], [report["http"]["throughput"][c]["seq_s"] for c in clients],
              label="service over HTTP")
    right.axhline(report["predict"]["throughput_seq_s"], color="red", linestyle="--",
                  label="model.predict per request")
    right.set(xlabel="concurrent clients", ylabel="sequences / s", title="Throughput, lengths 8..256")
    right.legend()
    fig.suptitle(f"default model (2x BiGRU-128) on {report['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    args = parser.parse_args()

    from app.formats import load_bundle

    rng = np.random.default_rng(0)
    bundle = load_bundle(ROOT / "models" / "segmenter")
    process, seconds_to_ready = start_server()
    try:
        http = asyncio.run(bench_http(HOST, PORT, bundle.spec.vocab_size, rng, args.quick))
        http["seconds_to_ready"] = seconds_to_ready
    finally:
        process.terminate()
        process.wait(timeout=30)
    report = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
        "engine": bench_engine(bundle, rng, args.quick),
        "predict": bench_predict(bundle, rng, args.quick),
        "http": http,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / "bench.png")
    markdown = table(report)
    (RESULTS / "latest.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote latest.json, latest.md and bench.png in {RESULTS}")


if __name__ == "__main__":
    main()
