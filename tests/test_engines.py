"""Every engine, the way the service runs it: exact against the GPU's outputs for the default
model, batched == alone, and ``ENGINE=auto`` choosing the fastest by measurement. (Each
engine against the NumPy reference for other architectures: ``test_conversion``.)"""

from __future__ import annotations

import os
import signal
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest

from app.engine import engine_choice
from app.engine.buckets import length_buckets
from app.engine.engine_choice import CANDIDATES, choose_engine
from app.engine.runner import Runner
from app.engine.selfcheck import run_self_check
from app.formats.bundle import load_bundle
from app.lowering.onnx_graph import build_onnx_model
from tests.conftest import DEFAULT_MODEL
from tests.helpers import ENGINES, max_diff, runner_for

GPU_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def runner_of(bundle) -> Callable[[str], Runner]:
    """One runner per engine for the module: the keras engine compiles each padded shape once."""
    return cache(lambda engine: runner_for(bundle.spec, engine, max_len=512, max_batch_size=32))


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_passes_the_self_check_within_1e_5_of_the_gpu(bundle, runner_of, engine: str) -> None:
    runner = runner_of(engine)
    check = run_self_check(bundle.parity, runner.run, GPU_TOLERANCE)
    assert check.passed, check.as_dict()
    assert check.max_abs_diff_hidden is not None


@pytest.mark.parametrize("engine", ENGINES)
def test_batched_equals_alone(bundle, runner_of, engine: str) -> None:
    runner = runner_of(engine)
    # keras compiles every padded shape (seconds each): its sequences up to 48 steps here (six
    # length buckets); test_exactness checks it alone and batched up to 2048.
    sequences = [s for s in bundle.parity.sequences if engine != "keras" or len(s) <= 48]
    together = runner.run(sequences)
    alone = [runner.run([sequence])[0] for sequence in sequences]
    for which in (0, 1):
        assert max_diff([r[which] for r in together], [r[which] for r in alone]) <= GPU_TOLERANCE


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "keras"])
def test_calls_side_by_side_equal_calls_alone(bundle, runner_of, engine: str) -> None:
    """The service runs engine calls in parallel threads: each must get exactly its own numbers
    (the native engine also moves a lone call's second direction to a thread of its own)."""
    runner = runner_of(engine)
    sequences = bundle.parity.sequences
    alone = [runner.run([sequence])[0] for sequence in sequences]
    groups = [sequences[i::4] for i in range(4)] * 3
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(runner.run, groups))
    for index, results in enumerate(together):
        expected = alone[index % 4::4]
        for which in (0, 1):
            assert max_diff([r[which] for r in results], [r[which] for r in expected]) <= 1e-6


def test_the_native_kernel_gives_the_same_bits_on_two_threads_and_batched_or_alone(bundle) -> None:
    from app.engine.native_engine import NativeEngine

    ids = np.random.default_rng(5).integers(2, bundle.spec.vocab_size, (9, 50)).astype(np.int32)
    lengths = np.array([50, 1, 33, 50, 7, 2, 49, 16, 3], np.int32)  # 9 rows: every row kernel
    one, two = (NativeEngine(bundle.spec, threads).run(ids, lengths) for threads in (1, 2))
    alone = [NativeEngine(bundle.spec, 1).run(ids[row:row + 1, :length], lengths[row:row + 1])
             for row, length in enumerate(lengths)]
    for which, (a, b) in enumerate(zip(one, two)):
        for row, length in enumerate(lengths):
            np.testing.assert_array_equal(a[row, :length], b[row, :length])
            np.testing.assert_array_equal(a[row, :length], alone[row][which][0])
    hidden = two[1]
    assert not any(hidden[row, length:].any() for row, length in enumerate(lengths))  # as ONNX's


def test_the_native_engine_keeps_a_calls_scratch_up_to_kept_tokens(bundle) -> None:
    """A call of at most ``kept_tokens`` padded tokens leaves its scratch for the thread's next
    call (no fresh mappings per call); a larger call lets it go."""
    from app.engine.native_engine import NativeEngine

    engine = NativeEngine(bundle.spec, 1, kept_tokens=256)

    def held_after(batch: int) -> int:
        engine.run(np.ones((batch, 64), np.int32), np.full(batch, 64, np.int32))  # results dropped
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        idle = tracemalloc.get_traced_memory()[0]
        kept = held_after(4)  # 256 padded tokens
        assert kept - idle > 256 * 4 * 1024  # at least the projected inputs: 384 floats a token, both ways
        assert held_after(4) - kept < 4096  # reused, not grown
        assert held_after(8) - idle < 64 * 1024  # 512 tokens: let go
    finally:
        tracemalloc.stop()


def test_a_forked_child_runs_the_native_kernel_on_two_threads(bundle) -> None:
    """The kernel's partner thread (which runs a lone call's second direction) is not copied
    by fork: a child started after the parent used it starts its own instead of waiting.
    (A call of COLD_TOKENS is offered to the partner even after the engine sat idle.)"""
    from app.engine.native_engine import COLD_TOKENS, NativeEngine

    engine = NativeEngine(bundle.spec, 2)
    ids = np.full((1, COLD_TOKENS), 5, np.int32)
    lengths = np.array([COLD_TOKENS], np.int32)
    expected = engine.run(ids, lengths)[0]
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is its exit status
        os._exit(0 if np.array_equal(engine.run(ids, lengths)[0], expected) else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert done[0] == child and os.waitstatus_to_exitcode(done[1]) == 0


def test_two_threads_give_one_threads_numbers_whoever_runs_the_second_direction(bundle) -> None:
    """A lone call's second direction runs on the partner thread, or on the caller when the
    partner has not claimed it by the time the caller's own direction is done (after idle
    moments, as here, both happen): the same numbers as one thread, to the bit."""
    from app.engine.native_engine import NativeEngine

    rng = np.random.default_rng(7)
    one, two = NativeEngine(bundle.spec, 1), NativeEngine(bundle.spec, 2)
    for index in range(24):
        lengths = rng.integers(1, 600, size=1 + index % 3).astype(np.int32)
        ids = rng.integers(1, 90, size=(len(lengths), int(lengths.max()))).astype(np.int32)
        time.sleep((0, 0.002, 0.006)[index % 3])
        for got, expected in zip(two.run(ids, lengths), one.run(ids, lengths), strict=True):
            assert np.array_equal(got, expected)


def test_a_short_call_after_idle_runs_on_one_thread() -> None:
    """Waking a sleeping second thread costs more than a short call alone on a virtual machine
    whose cores sat idle; a long call, or one soon after the last, still gets both. The longer
    the call, the longer the rest it takes to give up the partner."""
    from app.engine.native_engine import COLD_AFTER_S, COLD_AFTER_S_PER_TOKEN, COLD_TOKENS, call_threads

    def threshold(tokens: int) -> float:
        return COLD_AFTER_S + tokens * COLD_AFTER_S_PER_TOKEN

    short, shorter = COLD_TOKENS - 1, COLD_TOKENS // 4
    assert call_threads(2, 0, short, threshold(short) * 1.01) == 1
    assert call_threads(2, 0, short, threshold(short) * 0.99) == 2
    assert call_threads(2, 0, shorter, threshold(shorter) * 1.01) == 1
    assert threshold(shorter) < threshold(short)
    assert call_threads(2, 0, COLD_TOKENS, 3600.0) == 2
    assert call_threads(2, 1, COLD_TOKENS * 8, 0.0) == 1  # beside another call: one each
    assert call_threads(1, 0, COLD_TOKENS * 8, 0.0) == 1


def test_rests_count_the_last_one_and_their_recent_average() -> None:
    """After a run of long rests, a short one still counts as long (the cores come back
    sharing one for a while); after a run of short ones, a short one is short. A rest past
    LONG_REST_S counts as that long in the average, so one hour's rest is forgotten as fast
    as a few milliseconds'."""
    from app.engine.native_engine import LONG_REST_S, RECENT_WEIGHT, Rests

    clock = [100.0]
    rests = Rests(lambda: clock[0])

    def rest(seconds: float) -> float:
        rests.resting()
        clock[0] += seconds
        return rests.ended()

    assert rest(3600.0) == 3600.0
    assert rests.average == pytest.approx(RECENT_WEIGHT * LONG_REST_S)
    for _ in range(40):
        rest(0.0001)
    assert rest(0.0001) == pytest.approx(0.0001, rel=0.5)
    for _ in range(40):
        rest(0.05)
    assert rest(0.0001) > 0.6 * LONG_REST_S


def test_reversed_lowering_equals_sequence_lens_lowering_in_onnxruntime(bundle) -> None:
    """The graph OpenVINO gets, run by ONNX Runtime: the same numbers as the serving graph."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    lengths = np.array([1, 7, 40, 13, 64, 2], np.int32)
    ids = np.zeros((len(lengths), lengths.max()), np.int32)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, bundle.spec.vocab_size, length)
    graphs = [build_onnx_model(bundle.spec, backward).SerializeToString()
              for backward in ("sequence_lens", "reversed")]
    results = [ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
               .run(None, {"ids": ids, "lengths": lengths}) for graph in graphs]
    for got, expected in zip(results[1], results[0]):
        for row, length in enumerate(lengths):
            np.testing.assert_allclose(got[row, :length], expected[row, :length], atol=1e-6)


def test_auto_times_every_candidate_and_serves_the_fastest(bundle) -> None:
    buckets = length_buckets(256)
    choice = choose_engine("auto", bundle.spec, None, buckets, 8, budget_s=0.2)
    report = choice.as_dict()
    assert report["requested"] == "auto" and set(report["timings"]) == set(CANDIDATES)
    timed = {name: t for name, t in choice.timings.items() if t.error is None}
    assert choice.engine.name == min(timed, key=lambda name: timed[name].score_ms)
    assert all(t.rounds >= 3 and t.lone_ms > 0 and t.batch_ms > 0 for t in timed.values())
    check = run_self_check(bundle.parity, Runner(choice.engine, buckets, 8).run, GPU_TOLERANCE)
    assert check.passed


def test_auto_with_one_candidate_serves_it_untimed(bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_choice, "CANDIDATES", ("onnxruntime",))
    choice = choose_engine("auto", bundle.spec, None, length_buckets(64), 8)
    assert choice.engine.name == "onnxruntime"
    assert choice.as_dict()["timings"] == {"onnxruntime": {"untimed": "the only candidate available"}}


def test_a_named_engine_is_served_without_timing(bundle) -> None:
    choice = choose_engine("onnxruntime", bundle.spec, None, length_buckets(64), 8)
    assert choice.engine.name == "onnxruntime" and choice.timings == {}
