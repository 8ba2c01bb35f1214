"""The benchmark's results as Markdown tables (printed, saved, pasted into docs/benchmark.md) and a plot."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from bench.breakdown import PHASES
from bench.inprocess import SPORADIC_GAP_S

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmark.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TARGET_LATENCY, TARGET_THROUGHPUT = 0.6, 1.5  # the targets: HTTP p50 <= 0.6x XLA, 32 conns >= 1.5x


def machine() -> str:
    model, flags = "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{os.cpu_count()} CPU cores ({model}, {vector}), {platform.machine()}, "
            f"Python {platform.python_version()}")


def _key(rows: dict, n: int) -> dict:
    return rows[n] if n in rows else rows[str(n)]


def _pair(row: dict) -> str:
    return f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f}"


def markdown(r: dict) -> str:
    http, xla, engines, h100 = r["http"], r["xla_keras"], r["engines"], r["h100"]
    lengths = [int(n) for n in http["latency"]]
    names = list(engines)
    lines = [
        f"Machine: {r['machine']}; load average before/after: "
        f"{r['load_average_before'][0]:.1f} / {r['load_average_after'][0]:.1f}"
        + (" (a --quick smoke run, not a measurement)" if r.get("quick") else ""),
        "",
        "One sequence, p50 / p99 in ms; XLA Keras = `tf.function(jit_compile=True)` over the Keras model, "
        "in-process, every shape compiled first:",
        *_latency_table(r, "latency", lengths, names),
    ]
    if "sporadic" in http and "sporadic" in xla:  # absent from older results
        lines += [
            "",
            "Sporadic: one sequence at a time, each a random while after the last answer "
            f"({1000 * SPORADIC_GAP_S:.0f} ms on average, exponential), as a quiet real-time service "
            "gets them (the cores idle in between), p50 / p99 in ms:",
            *_latency_table(r, "sporadic", lengths, names),
        ]
    lines += [
        "",
        f"Throughput, one sequence per request, lengths uniform in 8..256, over HTTP driven by wrk; "
        f"XLA Keras in-process on the same lengths as sorted, masked batches of 32: "
        f"**{xla['throughput_seq_s']:.0f} seq/s**; H100 (cuDNN, batch of 32): "
        f"{h100['seqs_per_s']:.0f} seq/s.",
        "",
        "| connections | seq/s | p50 ms | p99 ms | errors | vs XLA Keras | vs H100 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, row in http["throughput"].items():
        lines.append(f"| {c} | {row['seq_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                     f"{row['errors']} | {row['seq_s'] / xla['throughput_seq_s']:.2f}x | "
                     f"{row['seq_s'] / h100['seqs_per_s']:.2f}x |")
    lines += ["", "In-process, batches of 32 (sorted lengths 8..256): "
              + "; ".join(f"{n} {e['throughput_seq_s']:.0f} seq/s ({e['workers']} one-thread calls "
                          f"side by side, {e['throughput_seq_s'] / xla['throughput_seq_s']:.2f}x XLA Keras)"
                          for n, e in engines.items()) + "."]
    if r.get("arithmetic"):
        lines += ["", _arithmetic(r)]
    lines += ["", *_notes(r)]
    if r.get("breakdown"):
        lines += ["", breakdown_markdown(r["breakdown"])]
    return "\n".join(lines)


def _latency_table(r: dict, key: str, lengths: list[int], names: list[str]) -> list[str]:
    """One sequence's p50 / p99 per length (``key``: "latency", back to back, with the HTTP
    p99/p50; or "sporadic"), in process and over HTTP."""
    http, xla, engines = r["http"], r["xla_keras"], r["engines"]
    steadiness = key == "latency"
    lines = [
        "",
        "| tokens | XLA Keras in-process | " + " | ".join(f"{n} in-process" for n in names)
        + " | service over HTTP | HTTP / XLA (p50) |" + (" HTTP p99/p50 |" if steadiness else ""),
        "|---:|---:|" + "---:|" * len(names) + "---:|---:|" + ("---:|" if steadiness else ""),
    ]
    for n in lengths:
        net, peer = _key(http[key], n), _key(xla[key], n)
        cells = [_pair(_key(engines[e][key], n)) for e in names]
        lines.append(f"| {n} | {_pair(peer)} | " + " | ".join(cells) + f" | {_pair(net)} | "
                     f"{net['p50_ms'] / peer['p50_ms']:.2f}x |"
                     + (f" {net['p99_over_p50']:.2f} |" if steadiness else ""))
    return lines


def _arithmetic(r: dict) -> str:
    """Each engine's speed as GFLOP/s (bench/arithmetic.py) beside the machine's peak."""
    a = r["arithmetic"]
    flops, peak, cores = a["flops_per_token"], a["peak_gflops_per_core"], a["cores"]
    peers = {**r["engines"], "XLA Keras": r["xla_keras"]}

    def lone(row: dict, n: int) -> str:
        return f"{n * flops / _key(row['latency'], n)['p50_ms'] / 1e6:.1f}"

    cells = [f"{name} {lone(e, 64)} / {lone(e, 2048)} / "
             f"{e['throughput_seq_s'] * a['mixed_mean_tokens'] * flops / 1e9:.1f}"
             for name, e in peers.items()]
    top = f"{peak:.0f} GFLOP/s per core, {peak * cores:.0f} on {cores}" if peak else "not measured"
    return (f"Arithmetic: the model costs {flops / 1e6:.2f} MFLOP per token (bench/arithmetic.py); "
            f"the FMA peak measured here: {top}. GFLOP/s, one sequence of 64 / of 2048 tokens / "
            "batches of 32 on every core: " + "; ".join(cells) + ".")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def breakdown_markdown(b: dict) -> str:
    """Where a lone request's time goes (in process, per phase) and, under 32 connections,
    the server's CPU and interpreter-lock time per request (``bench/breakdown.py``)."""
    lone, load = b["lone"], b["load"]
    lengths = sorted(int(n) for n in lone)
    load_average = (f"load average before/after: {b['load_average_before'][0]:.1f} / "
                    f"{b['load_average_after'][0]:.1f}" if "load_average_before" in b else "")
    lines = [
        "Where the time goes: a lone `/infer` request, the app driven in process through its ASGI "
        "interface (no socket), p50 in ms per phase (`bench/breakdown.py`; medians of each phase, "
        f"so they need not add up to the median total; {load_average}"
        + ("; a --quick smoke run" if b.get("quick") else "") + "):",
        "",
        "| phase | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for phase in PHASES:
        lines.append(f"| {phase} | " + " | ".join(_ms(_key(lone, n).get(phase)) for n in lengths) + " |")
    lines.append("| **total** | " + " | ".join(f"**{_ms(_key(lone, n)['total'])}**" for n in lengths) + " |")
    for key, label in (("loop cpu", "CPU: event loop"), ("parse cpu", "CPU: parsing thread"),
                       ("engine cpu", "CPU: engine thread")):
        lines.append(f"| {label} | " + " | ".join(_ms(_key(lone, n).get(key)) for n in lengths) + " |")
    threads = load["cpu_ms_per_request_by_thread"]
    gil = load.get("gil") or {}
    text = (f"Under load (wrk, {load['connections']} connections, lengths 8..256, {load['seq_s']:.0f} "
            f"seq/s, {load['errors']} errors): the server used **{load['cpu_ms_per_request']:.2f} ms of "
            f"CPU per request** (event loop {threads['event loop']:.2f}, engine threads "
            f"{threads['engine threads']:.2f}, other threads {threads['other threads']:.2f})")
    if "gil_ms_per_request" in gil:
        by = gil["gil_ms_per_request_by_thread"]
        text += (f"; a thread held the interpreter lock **{gil['gil_ms_per_request']:.2f} ms per request** "
                 f"(py-spy `record --gil` at {gil['rate_hz']} Hz over a second run, {gil['seq_s']:.0f} "
                 "seq/s: "
                 f"event loop {by['event loop']:.2f}, engine threads {by['engine threads']:.2f}, "
                 f"other threads {by['other threads']:.2f}; wall time with the lock held, so a holder "
                 "descheduled by other processes counts: on a loaded machine it can pass the CPU time).")
    else:
        text += f"; interpreter lock not sampled: {gil.get('error', 'no py-spy run')}."
    lines += ["", text]
    return "\n".join(lines)


def _notes(r: dict) -> list[str]:
    http, xla, bare, h100 = r["http"], r["xla_keras"], r["bare_uvicorn"], r["h100"]
    net64, peer64 = _key(http["latency"], 64), _key(xla["latency"], 64)
    thirty_two = _key(http["throughput"], 32)
    latency_ratio = net64["p50_ms"] / peer64["p50_ms"]
    throughput_ratio = thirty_two["seq_s"] / xla["throughput_seq_s"]
    steadiest = max(row["p99_over_p50"] for row in http["latency"].values())
    new_lengths = http.get("new_lengths") or {}
    first = max((row["first_over_p50"] for row in new_lengths.values()), default=float("nan"))
    errors = sum(row["errors"] for row in http["throughput"].values())
    choice = http.get("engine_choice") or {}
    timings = "; ".join(f"{name} {t['lone_ms']:.2f} ms lone + {t['batch_ms']:.1f} ms batch"
                        if "lone_ms" in t else f"{name}: {t.get('error') or t.get('untimed')}"
                        for name, t in (choice.get("timings") or {}).items())
    engine64 = min(_key(e["latency"], 64)["p50_ms"] for e in r["engines"].values())
    return [
        f"- Targets: 64 tokens over HTTP at **{latency_ratio:.2f}x** XLA Keras in-process "
        f"(target <= {TARGET_LATENCY}: {'met' if latency_ratio <= TARGET_LATENCY else 'not met'}); "
        f"32 connections at **{throughput_ratio:.2f}x** XLA Keras batched "
        f"(target >= {TARGET_THROUGHPUT}: {'met' if throughput_ratio >= TARGET_THROUGHPUT else 'not met'}); "
        f"{errors} errors; HTTP p99/p50 at most {steadiest:.2f} over every length up to MAX_LEN "
        f"({'< 2' if steadiest < 2 else 'NOT < 2'}); the first request at each of {len(new_lengths)} "
        f"lengths never seen before (1..MAX_LEN) took at most {first:.2f}x the requests after it "
        f"({'no compile on the request path' if first < 2 else 'a spike: look for compilation'}).",
        f"- H100 anchor (`models/segmenter/provenance.json`, PyTorch cuDNN, TF32): one 64-token sequence "
        f"{h100['single_len64_ms']:.2f} ms, {h100['seqs_per_s']:.0f} seq/s on a batch of 32 of "
        "lengths 8..256.",
        f"- Service: ENGINE=auto chose **{http['engine']}** ({timings}); ready "
        f"{http['seconds_to_ready']:.2f} s after the process started "
        f"({http['service_seconds_to_ready']:.2f} s by its own clock, self-check "
        f"{http['self_check']['max_abs_diff_outputs']:.1e} against the GPU).",
        f"- HTTP cost: a bare uvicorn answer (no routing, no parsing, no model) takes "
        f"{bare['latency_64']['p50_ms']:.2f} ms p50 and {_cpu(bare['latency_64'])} of server CPU for a "
        f"64-token body, and serves {bare['throughput_32']['seq_s']:.0f} req/s at 32 connections; "
        f"the service answers a 64-token request in {_cpu(net64)} of CPU against "
        f"{_cpu(_key(r['engines'][http['engine']]['latency'], 64), 'cpu_ms')} for its engine's call "
        f"in-process, and adds {net64['p50_ms'] - engine64:.2f} ms of wall time to the fastest engine.",
        *_grpc(r),
        f"- XLA Keras compiled its {len(xla['latency'])} latency shapes and the batches' shapes in "
        f"{xla['compile_s']:.1f} s before timing. Footnote: `model.predict` on one 64-token sequence: "
        f"{xla['predict_64_p50_ms']:.1f} ms p50 (fixed per-call overhead; not a peer).",
    ]


def _grpc(r: dict) -> list[str]:
    """gRPC against HTTP for one 64-token request (bench/grpc_latency.py)."""
    g = r.get("grpc")
    if not g:
        return []
    grpc_, http, both = g["grpc"], g["http"], g.get("grpc_both_outputs")
    met = "met" if grpc_["p50_ms"] <= http["p50_ms"] else "not met"
    hidden = (f"; naming no output (`hidden` too, {both['p50_ms']:.2f} ms p50, server CPU "
              f"{both['server_cpu_ms']:.2f} ms)" if both else "")
    return [f"- gRPC: one {g['tokens']}-token `ModelInfer` asking for `outputs` (what `/infer` answers) "
            f"p50 {grpc_['p50_ms']:.2f} ms (p99 {grpc_['p99_ms']:.2f}) against `/infer`'s "
            f"{http['p50_ms']:.2f} ms (p99 {http['p99_ms']:.2f}), Python clients (grpcio, httpx) taking "
            f"turns on one server; server CPU {grpc_['server_cpu_ms']:.2f} against "
            f"{http['server_cpu_ms']:.2f} ms per request{hidden} (target: gRPC's p50 <= HTTP's: {met})."]


def _cpu(row: dict, key: str = "server_cpu_ms_per_request") -> str:
    value = row.get(key)
    return "-" if value is None else f"{value:.2f} ms"


def paste_into(markdown_text: str, page: Path) -> None:
    """Replace what ``page`` holds between the ``bench:`` markers."""
    text = page.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise RuntimeError(f"{page} has no {START} ... {END} block")
    page.write_text(pattern.sub(lambda _: f"{START}\n{markdown_text}\n{END}", text))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    series = [("XLA Keras in-process", r["xla_keras"]["latency"]),
              *((f"{name} in-process", e["latency"]) for name, e in r["engines"].items()),
              ("service over HTTP", r["http"]["latency"])]
    for label, rows in series:
        lengths = sorted(int(n) for n in rows)
        left.plot(lengths, [_key(rows, n)["p50_ms"] for n in lengths], marker="o", label=label)
    left.plot([64], [r["h100"]["single_len64_ms"]], marker="*", markersize=12, linestyle="none",
              color="black", label="H100 cuDNN (64 tokens)")
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="p50 latency (ms)",
             title="Latency, one sequence")
    left.legend(fontsize=8)
    throughput = r["http"]["throughput"]
    right.bar([str(c) for c in throughput], [row["seq_s"] for row in throughput.values()],
              label="service over HTTP (wrk)")
    right.axhline(r["xla_keras"]["throughput_seq_s"], color="red", linestyle="--",
                  label="XLA Keras in-process, batches of 32")
    right.axhline(r["h100"]["seqs_per_s"], color="black", linestyle=":", label="H100 cuDNN, batch of 32")
    right.set(xlabel="connections", ylabel="sequences / s", title="Throughput, lengths 8..256")
    right.legend(fontsize=8)
    fig.suptitle(f"default model (2x BiGRU-128), {r['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
