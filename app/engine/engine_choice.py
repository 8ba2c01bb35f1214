"""``ENGINE=auto``: time the available engines on the model's own shapes and serve the fastest.

Which engine is fastest depends on the CPU (AVX2 or AVX-512, cache sizes) and on the
model's widths, so it is measured at start-up on this machine rather than assumed. Each
candidate runs the same work through the same :class:`~app.engine.runner.Runner` as in
serving: a lone request of 64 tokens (the latency case) and one full batch of
``max_batch_size`` sequences of lengths 8..256 (the throughput case), bounded by
``max_len``. Candidates take turns, round after round, until the time budget is spent, so
that a burst of noise from other processes hits them all alike. The winner has the lowest
geometric mean of the two median times: each case counts by its ratio, so a batch's long
time cannot drown a lone request's short one (a service answers many small batches).

Candidates: the engines that need no per-shape compilation (``native``, where its kernel
was built, ``onnxruntime``, and ``openvino`` where its package is installed). ``keras``
compiles each new shape with XLA and is chosen only by name.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from app.engine.engines import ARENA_KEPT_TOKENS, Engine, make_engine
from app.engine.runner import Runner
from app.spec import ModelSpec

log = logging.getLogger("app.engine")

CANDIDATES = ("native", "onnxruntime", "openvino")
LONE_LENGTH = 64
BATCH_LENGTHS = (8, 256)


@dataclass(frozen=True)
class Timing:
    """One candidate's median times, or why it could not run."""

    lone_ms: float | None = None
    batch_ms: float | None = None
    rounds: int = 0
    error: str | None = None

    @property
    def score_ms(self) -> float:
        """The geometric mean of the lone and batch times; lower is faster."""
        return float("inf") if self.error else ((self.lone_ms or 0) * (self.batch_ms or 0)) ** 0.5


@dataclass
class EngineChoice:
    engine: Engine
    requested: str
    timings: dict[str, Timing] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "requested": self.requested, "chosen": self.engine.name, "seconds": round(self.seconds, 3),
            "workload": {"lone_tokens": LONE_LENGTH, "batch_lengths": list(BATCH_LENGTHS)},
            "timings": {name: _rounded(timing) for name, timing in self.timings.items()},
        }


def choose_engine(kind: str, spec: ModelSpec, threads: int | None, length_buckets: list[int],
                  max_batch_size: int, budget_s: float = 0.5, keras_file: str | None = None,
                  kept_tokens: int = ARENA_KEPT_TOKENS) -> EngineChoice:
    """The engine named by ``kind``; for ``auto``, the fastest candidate on this machine.
    ``keras_file`` and ``kept_tokens``: as :func:`~app.engine.engines.make_engine` takes them."""
    if kind != "auto":
        return EngineChoice(make_engine(kind, spec, threads, length_buckets, keras_file, kept_tokens), kind)
    start = time.perf_counter()
    engines, errors = {}, {}
    for name in CANDIDATES:
        try:
            engines[name] = make_engine(name, spec, threads, length_buckets, kept_tokens=kept_tokens)
        except ImportError as exc:
            errors[name] = Timing(error=f"not installed: {exc.name or exc}")
        except Exception as exc:  # one candidate failing to build leaves the others to serve
            errors[name] = Timing(error=f"{type(exc).__name__}: {exc}")
            log.warning("engine %s could not be built: %s", name, errors[name].error)
    if not engines:
        raise RuntimeError(f"no engine available for ENGINE=auto: {errors}")
    if len(engines) == 1:  # nothing to compare it with: served untimed
        timings = {name: Timing() for name in engines}
    else:
        runners = {name: Runner(e, length_buckets, max_batch_size) for name, e in engines.items()}
        timings = _time_in_turns(runners, _workload(spec, length_buckets[-1], max_batch_size), budget_s)
    timings.update(errors)
    chosen = min(engines, key=lambda name: timings[name].score_ms)
    choice = EngineChoice(engines[chosen], "auto", timings, time.perf_counter() - start)
    log.info("engine: %s (auto; %s)", chosen,
             "; ".join(f"{name}: {timing.error or f'{timing.score_ms:.2f} ms (geometric mean)'}"
                       for name, timing in timings.items()),
             extra={"engine_choice": choice.as_dict()})
    return choice


def _workload(spec: ModelSpec, max_len: int, max_batch_size: int) -> list[list[np.ndarray]]:
    """A lone request and a full batch of mixed lengths, valid inputs of the model's kind."""
    rng = np.random.default_rng(0)

    def sequence(length: int) -> np.ndarray:
        return spec.input.sample(rng, min(length, max_len))

    batch = [sequence(int(n)) for n in rng.integers(BATCH_LENGTHS[0], BATCH_LENGTHS[1] + 1, max_batch_size)]
    return [[sequence(LONE_LENGTH)], batch]


def _time_in_turns(runners: dict[str, Runner], work: list[list[np.ndarray]],
                   budget_s: float) -> dict[str, Timing]:
    samples: dict[str, list[list[float]]] = {name: [[] for _ in work] for name in runners}
    for runner in runners.values():  # first calls allocate; not timed
        for sequences in work:
            runner.run(sequences)
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
        for name, runner in runners.items():
            for times, sequences in zip(samples[name], work):
                begin = time.perf_counter()
                runner.run(sequences)
                times.append(time.perf_counter() - begin)
        rounds += 1
    return {name: Timing(lone_ms=1000 * statistics.median(lone), batch_ms=1000 * statistics.median(batch),
                         rounds=rounds)
            for name, (lone, batch) in samples.items()}


def _rounded(timing: Timing) -> dict:
    if timing.error:
        return {"error": timing.error}
    if not timing.rounds:
        return {"untimed": "the only candidate available"}
    return {"lone_ms": round(timing.lone_ms or 0, 3), "batch_ms": round(timing.batch_ms or 0, 3),
            "rounds": timing.rounds}
