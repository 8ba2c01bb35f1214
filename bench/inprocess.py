"""In-process contenders, on the same sequences: XLA-compiled Keras written by hand as a
demanding user would (the strongest peer), and each of our engines through the runner the
service uses. ``model.predict`` is kept for a footnote only: its fixed overhead measures the
machine more than the model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.spec import ModelSpec

BATCH = 32  # sequences per call, as the service's MAX_BATCH_SIZE
# Sporadic requests: each a random while after the last one's answer (exponential, this long
# on average: Poisson arrivals, no rhythm to fall in step with), as a quiet real-time service
# gets them (the cores idle in between: on a virtual machine, waking them is not free).
SPORADIC_GAP_S = 0.01


def sporadic_gaps(count: int, seed: int = 0) -> list[float]:
    return np.random.default_rng(seed).exponential(SPORADIC_GAP_S, count).tolist()


def latency_stats(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    return {"p50_ms": p50, "p99_ms": p99, "max_ms": float(ms.max()), "p99_over_p50": p99 / p50, "n": len(ms)}


def timed(call: Callable[[], object], repeats: int, warm: int = 3,
          gaps_s: list[float] | None = None) -> list[float]:
    """Seconds per call; with ``gaps_s``, the i-th call that long after the last one's end."""
    for _ in range(warm):
        call()
    samples = []
    for i in range(repeats):
        if gaps_s:
            time.sleep(gaps_s[i])
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def repeats_for(length: int, quick: bool) -> int:
    full = 200 if length <= 64 else 60 if length <= 256 else 15
    return max(5, full // 10) if quick else full


def sporadic_repeats_for(length: int, quick: bool) -> int:
    full = 60 if length <= 256 else 15
    return max(5, full // 6) if quick else full


def latencies(call: Callable[[np.ndarray], object], singles: dict[int, list[np.ndarray]],
              quick: bool) -> tuple[dict, dict]:
    """Per length: back to back (with the process's CPU time per call), and sporadic
    (:func:`sporadic_gaps` apart)."""
    back_to_back, sporadic = {}, {}
    for n, inputs in singles.items():
        cycle = iter(inputs * (repeats_for(n, quick) + sporadic_repeats_for(n, quick) + 3))
        cpu_before = time.process_time()
        back_to_back[n] = latency_stats(timed(lambda c=cycle: call(next(c)), repeats_for(n, quick)))
        back_to_back[n]["cpu_ms"] = 1000 * (time.process_time() - cpu_before) / (back_to_back[n]["n"] + 3)
        repeats = sporadic_repeats_for(n, quick)
        sporadic[n] = latency_stats(timed(lambda c=cycle: call(next(c)), repeats, warm=0,
                                          gaps_s=sporadic_gaps(repeats, n)))
    return back_to_back, sporadic


def sorted_batches(sequences: list[np.ndarray]) -> list[list[np.ndarray]]:
    """What a demanding user does before batching: sort by length, then cut batches of 32."""
    ordered = sorted(sequences, key=len)
    return [ordered[i:i + BATCH] for i in range(0, len(ordered), BATCH)]


def padded(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and the mask of real tokens."""
    steps = max(len(s) for s in batch)
    ids = np.zeros((len(batch), steps), np.int32)
    for row, sequence in enumerate(batch):
        ids[row, :len(sequence)] = sequence
    return ids, np.arange(steps)[None, :] < np.array([len(s) for s in batch])[:, None]


class XlaKeras:
    """``tf.function(jit_compile=True)`` around the Keras model of ``app.convert``, all threads."""

    def __init__(self, spec: ModelSpec) -> None:
        import tensorflow as tf

        from app.lowering.keras_model import build_keras_model

        tf.get_logger().setLevel("ERROR")  # one trace per shape is the point, not a warning

        self.model = build_keras_model(spec)
        self._call = tf.function(lambda ids, mask: self.model([ids, mask], training=False),
                                 jit_compile=True)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> None:
        outputs, _ = self._call(ids, mask)
        outputs.numpy()

    def compile_shapes(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """Every shape compiled before anything is timed; returns the seconds it took."""
        start = time.perf_counter()
        for ids, mask in batches:
            self(ids, mask)
        return time.perf_counter() - start


def bench_xla_keras(spec: ModelSpec, singles: dict[int, list[np.ndarray]],
                    mixed: list[np.ndarray], quick: bool) -> dict:
    keras = XlaKeras(spec)
    batches = [padded(b) for b in sorted_batches(mixed)]
    single_inputs = {n: [padded([s]) for s in seqs] for n, seqs in singles.items()}
    compile_s = keras.compile_shapes(batches + [inputs[0] for inputs in single_inputs.values()])
    latency, sporadic = latencies(lambda inputs: keras(*inputs), single_inputs, quick)
    rounds = timed(lambda: [keras(*b) for b in batches], 2 if quick else 5, warm=1)
    predict_64 = bench_predict(keras.model, singles[64][:3], quick)
    return {"latency": latency, "sporadic": sporadic,
            "throughput_seq_s": len(mixed) / statistics.median(rounds),
            "compile_s": compile_s, "predict_64_p50_ms": predict_64}


def bench_predict(model: object, sequences: list[np.ndarray], quick: bool) -> float:
    """``model.predict`` on one 64-token sequence: the footnote."""
    inputs = [padded([s]) for s in sequences]
    samples = timed(lambda: model.predict(list(inputs[0]), verbose=0), 3 if quick else 10, warm=2)
    return latency_stats(samples)["p50_ms"]


def bench_engine(kind: str, spec: ModelSpec, singles: dict[int, list[np.ndarray]],
                 mixed: list[np.ndarray], max_len: int, workers: int, quick: bool) -> dict:
    """One engine as the service runs it: the runner, one-thread calls, ``workers`` of them
    side by side on the same sorted batches of 32."""
    from app.engine.buckets import length_buckets
    from app.engine.engines import make_engine
    from app.engine.runner import Runner

    buckets = length_buckets(max_len)
    runner = Runner(make_engine(kind, spec, None, buckets), buckets, BATCH)
    latency, sporadic = latencies(lambda sequence: runner.run([sequence]), singles, quick)
    batches = sorted_batches(mixed)
    with ThreadPoolExecutor(workers) as pool:
        rounds = timed(lambda: list(pool.map(runner.run, batches)), 2 if quick else 5, warm=1)
    return {"name": runner.engine.name, "latency": latency, "sporadic": sporadic,
            "throughput_seq_s": len(mixed) / statistics.median(rounds), "workers": workers}
