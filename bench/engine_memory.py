"""What each memory setting of the engine costs: time per call and the memory left behind.

Each setting runs in a process of its own (glibc's settings and ONNX Runtime's arena are
per process), one after the other in one run: the p50 (and CPU time) of many one-thread
calls of one sequence at 256 and 2048 tokens, then the RSS after a burst of the largest
requests (one sequence of 2048 tokens; 64 x 2048 through the runner as the service runs
them, ``MAX_BATCH_TOKENS`` padded tokens per call, two calls side by side, each call's
results, hidden states included, dropped once the next call is done), then a mix of random
shapes, to see whether what is kept stays bounded.

    python -m bench.engine_memory                 # every setting, a table
    python -m bench.engine_memory --setting shipped --json   # one, in this process
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

# name -> what it is (the table's words)
SETTINGS = {
    "before": "arena off, glibc mmap threshold 128 KiB (before)",
    "malloc-default": "arena off, glibc's default (dynamic) mmap threshold",
    "arena": "session arena on (grows in powers of two), threshold 128 KiB",
    "arena-shrink": "session arena, shrunk after every call",
    "arena-shrink-large": "session arena, memory patterns off, shrunk after calls of over 2048 padded tokens",
    "env-same-shrink-large": "shared (env) arena, kSameAsRequested, patterns off, shrunk over 2048 tokens",
    "mmap-32m-trim": "arena off, mmap and trim thresholds 32 MiB, malloc_trim after calls of 2048+ tokens",
    "iobinding": "arena off, threshold 128 KiB, outputs bound to fresh numpy arrays (IOBinding)",
    "shipped": "the engine as shipped (app.engine.engines, app.system.return_freed_memory)",
}
SHRINK_OVER = 2048  # padded tokens


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class Variant:
    """An ONNX Runtime session on the default model's graph with one memory setting. (The CPU
    provider ignores provider options such as ``arena_extend_strategy``: a strategy other than
    powers of two takes an arena registered in the environment, ``session.use_env_allocators``.)"""

    def __init__(self, setting: str, spec: object) -> None:
        import onnxruntime as ort

        from app.lowering.onnx_graph import build_onnx_model

        self.setting, self.input = setting, spec.input  # type: ignore[attr-defined]
        libc = ctypes.CDLL("libc.so.6")
        self.libc = libc
        if setting == "mmap-32m-trim":
            libc.mallopt(M_MMAP_THRESHOLD, 32 * MiB)
            libc.mallopt(M_TRIM_THRESHOLD, 32 * MiB)
        elif setting != "malloc-default":
            libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = setting.startswith("arena")
        if setting.endswith("shrink-large"):
            options.enable_mem_pattern = False
        if setting.startswith("env-same"):
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
            options.add_session_config_entry("session.use_env_allocators", "1")
        self.session = ort.InferenceSession(build_onnx_model(spec).SerializeToString(), options,  # type: ignore[arg-type]
                                            providers=["CPUExecutionProvider"])
        self.run_options = ort.RunOptions()
        self.shrinking = ort.RunOptions()
        self.shrinking.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        if setting == "arena-shrink":
            self.run_options = self.shrinking
        self.widths = [o.shape[-1] for o in self.session.get_outputs()]

    def run(self, inputs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = {self.input.name: inputs, "lengths": lengths.astype(np.int32)}
        if self.setting == "iobinding":
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            batch, steps = inputs.shape[:2]
            out = [np.empty((batch, steps, w), np.float32) for w in self.widths]
            for name, array in zip(("outputs", "hidden"), out):
                binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
            self.session.run_with_iobinding(binding, self.run_options)
            return out[0], out[1]
        large = inputs.shape[0] * inputs.shape[1] > SHRINK_OVER
        options = self.shrinking if self.setting.endswith("shrink-large") and large else self.run_options
        outputs, hidden = self.session.run(["outputs", "hidden"], feeds, options)
        if self.setting == "mmap-32m-trim" and inputs.shape[0] * inputs.shape[1] >= SHRINK_OVER:
            self.libc.malloc_trim(0)
        return outputs, hidden

    pad_shape = staticmethod(lambda batch, steps: (batch, steps))


def engine_for(setting: str, spec: object) -> object:
    if setting == "shipped":
        from app.engine.engines import make_engine
        from app.system import return_freed_memory

        return_freed_memory()
        return make_engine("onnxruntime", spec, 1, [])  # type: ignore[arg-type]
    return Variant(setting, spec)


def measure(setting: str, repeats: int) -> dict:
    from app.engine.buckets import length_buckets
    from app.engine.runner import Runner
    from app.formats.bundle import load_bundle

    spec = load_bundle(ROOT / "models" / "segmenter").spec
    engine = engine_for(setting, spec)
    rng = np.random.default_rng(0)
    low, high = spec.input.id_range  # type: ignore[union-attr]
    ready = rss()
    result: dict = {"setting": setting, "what": SETTINGS[setting], "rss_ready_mib": ready / MiB}
    for n in (256, 2048):
        ids = rng.integers(max(low, 2), high, (1, n)).astype(np.int32)
        lengths = np.array([n], np.int32)
        for _ in range(3):
            engine.run(ids, lengths)  # type: ignore[attr-defined]
        walls, cpus = [], []
        for _ in range(repeats if n == 256 else max(repeats // 6, 10)):
            cpu, wall = time.thread_time(), time.perf_counter()
            engine.run(ids, lengths)  # type: ignore[attr-defined]
            walls.append(time.perf_counter() - wall)
            cpus.append(time.thread_time() - cpu)
        result[f"p50_ms_{n}"] = 1000 * statistics.median(walls)
        result[f"cpu_ms_{n}"] = 1000 * statistics.median(cpus)
    buckets = length_buckets(2048)
    runner = Runner(engine, buckets, 32, 8192)  # type: ignore[arg-type]
    one = [rng.integers(max(low, 2), high, 2048).astype(np.int32)]
    reset_peak()
    runner.run(one)
    result["after_1x2048_mib"] = rss() / MiB
    result["peak_1x2048_mib"] = peak_rss() / MiB
    reset_peak()
    parts = [[rng.integers(max(low, 2), high, 2048).astype(np.int32) for _ in range(4)] for _ in range(16)]
    with ThreadPoolExecutor(2) as pool:  # two calls side by side, results dropped as they come
        for results in pool.map(runner.run, parts):
            del results
    result["after_64x2048_mib"] = rss() / MiB
    result["peak_64x2048_mib"] = peak_rss() / MiB
    reset_peak()
    mixed = [[rng.integers(max(low, 2), high, int(n)).astype(np.int32)
              for n in rng.integers(1, 2049, int(rng.integers(1, 5)))] for _ in range(150)]
    with ThreadPoolExecutor(2) as pool:
        for results in pool.map(runner.run, mixed):
            del results
    result["after_mixed_mib"] = rss() / MiB
    result["peak_mixed_mib"] = peak_rss() / MiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, help="measure one setting in this process")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings to compare")
    parser.add_argument("--repeats", type=int, default=120, help="calls timed at 256 tokens (2048: a sixth)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(measure(args.setting, args.repeats)))
        return
    load = [os.getloadavg()[0]]
    rows = []
    for setting in args.settings.split(","):
        run = subprocess.run([sys.executable, "-m", "bench.engine_memory", "--setting", setting,
                              "--repeats", str(args.repeats)], cwd=ROOT, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        load.append(os.getloadavg()[0])
    if args.json:
        print(json.dumps({"rows": rows, "load": load}, indent=2))
        return
    print(f"load average (1 min) before and after each setting: {', '.join(f'{x:.1f}' for x in load)}")
    print("| setting | 256 tokens p50 / CPU ms | 2048 tokens p50 / CPU ms | RSS ready "
          "| after 1 x 2048 (peak) | after 64 x 2048 (peak) | after a mix of shapes (peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['p50_ms_256']:.2f} / {r['cpu_ms_256']:.2f} | {r['p50_ms_2048']:.1f} / "
              f"{r['cpu_ms_2048']:.1f} | {r['rss_ready_mib']:.0f} | {r['after_1x2048_mib']:.0f} "
              f"({r['peak_1x2048_mib']:.0f}) | {r['after_64x2048_mib']:.0f} ({r['peak_64x2048_mib']:.0f}) | "
              f"{r['after_mixed_mib']:.0f} ({r['peak_mixed_mib']:.0f}) |")


if __name__ == "__main__":
    main()
