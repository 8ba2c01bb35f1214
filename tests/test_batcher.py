"""The micro-batcher as requests see it: the queue bound is exactly ``max_queue`` and a
full queue refuses at once; work whose caller gave up (a deadline) is never computed;
every caller gets its own results, even among jobs of identical shape; and the metrics
it feeds mean what their names say (time waiting in the queue vs time in the engine).

The engine is the real ONNX Runtime engine behind a gate (``tests.helpers.GatedEngine``)
that records every call and can hold the engine busy, as a long call does in production."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest

from app.engine.buckets import length_buckets
from app.engine.engines import OnnxRuntimeEngine
from app.engine.runner import Runner
from app.observability import BatchStats, Metrics
from app.service.batcher import MicroBatcher, QueueFull
from app.spec import ModelSpec
from tests.helpers import GatedEngine, spec_of
from tests.reference import NativeModel, random_model

T = TypeVar("T")
VOCAB = 30


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[NativeModel, ModelSpec]:
    native = random_model(np.random.default_rng(13), vocab=VOCAB, width=6, units=5, layers=1)
    return native, spec_of(native, tmp_path_factory.mktemp("batcher"))


def tokens(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, length).astype(np.int32)


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.002)


def with_batcher(scenario: Callable[[MicroBatcher, GatedEngine], Awaitable[T]], spec: ModelSpec, *,
                 workers: int = 1, max_queue: int = 64, max_batch_size: int = 8,
                 max_delay_s: float = 0.0, in_place_tokens: int = 0) -> T:
    """Runs ``scenario`` against a started batcher; always opens the gate and closes it."""
    async def main() -> T:
        engine = GatedEngine(OnnxRuntimeEngine(spec, threads=1))
        runner = Runner(engine, length_buckets(64), max_batch_size)  # type: ignore[arg-type]
        batcher = MicroBatcher(runner, workers, max_batch_size, max_delay_s, max_queue, in_place_tokens)
        batcher.start()
        try:
            return await scenario(batcher, engine)
        finally:
            engine.gate.set()
            await batcher.close()

    return asyncio.run(main())


def with_batcher_calls(scenario: Callable[[MicroBatcher, GatedEngine], Awaitable[None]], spec: ModelSpec,
                       **options: float) -> list[list[tuple[int, ...]]]:
    """Runs ``scenario`` and returns what the engine ran, call by call."""
    seen: list[list[list[tuple[int, ...]]]] = []

    async def recorded(batcher: MicroBatcher, engine: GatedEngine) -> None:
        seen.append(engine.calls)
        await scenario(batcher, engine)

    with_batcher(recorded, spec, **options)
    return seen[0]


def test_the_queue_holds_exactly_max_queue_and_refuses_at_once(model: tuple[NativeModel, ModelSpec]) -> None:
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        running = asyncio.ensure_future(batcher.submit([tokens(0, 5)]))
        await eventually(lambda: engine.started == 1)  # taken off the queue, engine busy
        waiting = [asyncio.ensure_future(batcher.submit([tokens(i, 4), tokens(i + 50, 6)]))
                   for i in range(1, 4)]
        await eventually(lambda: batcher.pending == 6)  # exactly max_queue sequences wait
        for extra in ([tokens(9, 3)], [tokens(9, 3)] * 3):
            # "at once": well before anything queued could finish, the refusal itself
            with pytest.raises(QueueFull):
                await asyncio.wait_for(batcher.submit(extra), timeout=1.0)
        assert batcher.pending == 6  # a refused request leaves nothing behind
        engine.gate.set()
        results = await asyncio.gather(running, *waiting)
        assert [len(r) for r in results] == [1, 2, 2, 2]
        assert batcher.pending == 0
        assert len(await batcher.submit([tokens(10, 3)] * 6)) == 6  # room again, up to the bound

    with_batcher(scenario, model[1], max_queue=6)


def test_work_of_a_caller_that_gave_up_is_not_run(model: tuple[NativeModel, ModelSpec]) -> None:
    """A request past its deadline (504) or whose client left must not cost engine time."""
    abandoned = [tokens(100, 7), tokens(101, 9)]

    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        running = asyncio.ensure_future(batcher.submit([tokens(1, 5)]))
        await eventually(lambda: engine.started == 1)
        with pytest.raises(TimeoutError):  # what the route does with REQUEST_TIMEOUT_S
            await asyncio.wait_for(batcher.submit(abandoned), timeout=0.05)
        engine.gate.set()
        await running
        after = await batcher.submit([tokens(2, 6)])  # the loop has gone round since
        assert len(after) == 1
        assert batcher.pending == 0

    engine_calls = with_batcher_calls(scenario, model[1])
    ran = {sequence for call in engine_calls for sequence in call}
    assert tuple(tokens(1, 5).tolist()) in ran and tuple(tokens(2, 6).tolist()) in ran
    assert not any(tuple(s.tolist()) in ran for s in abandoned)


def test_each_caller_gets_its_own_results_among_identical_shapes(
    model: tuple[NativeModel, ModelSpec],
) -> None:
    native, spec = model
    requests = [[tokens(seed, 12)] for seed in range(20, 26)] + [[tokens(30, 12), tokens(31, 12)]]

    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> list:
        engine.gate.clear()
        first = asyncio.ensure_future(batcher.submit([tokens(19, 12)]))
        await eventually(lambda: engine.started == 1)
        # These queue up behind the busy engine and run together, in one call.
        rest = [asyncio.ensure_future(batcher.submit(r)) for r in requests]
        await eventually(lambda: batcher.pending == 8)
        engine.gate.set()
        await first
        return await asyncio.gather(*rest)

    results = with_batcher(scenario, spec)
    for request, result in zip(requests, results):
        assert len(result) == len(request)
        for sequence, (outputs, hidden) in zip(request, result):
            np.testing.assert_allclose(outputs, native.outputs(sequence), rtol=0, atol=1e-5)
            np.testing.assert_allclose(hidden, native.hidden(sequence), rtol=0, atol=1e-5)


def test_metrics_tell_queue_wait_from_compute(model: tuple[NativeModel, ModelSpec]) -> None:
    """One call held busy for HOLD seconds while two more requests wait for it: the queue
    histogram sees three waits (two of about HOLD), the compute one two engine calls (one
    of about HOLD), and the batch histogram one call of 1 and one of 2 sequences."""
    hold = 0.3
    metrics = Metrics()
    calls: list[BatchStats] = []
    held: list[float] = []

    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        batcher.on_batch += [lambda stats: metrics.observe_batch(stats, "m", "1"), calls.append]
        engine.gate.clear()
        started = time.perf_counter()
        first = asyncio.ensure_future(batcher.submit([tokens(40, 5)]))
        await eventually(lambda: engine.started == 1)
        queued = [asyncio.ensure_future(batcher.submit([tokens(seed, 5)])) for seed in (41, 42)]
        await asyncio.sleep(hold)
        engine.gate.set()
        held.append(time.perf_counter() - started)  # at least hold; more on a busy machine
        await asyncio.gather(first, *queued)

    with_batcher(scenario, model[1])
    model = {"model": "m", "version": "1"}

    def value(name: str, labels: dict[str, str] | None = None) -> float | None:
        return metrics.registry.get_sample_value(name, {**model, **(labels or {})})

    assert value("bigru_queue_wait_seconds_count") == 3  # one per request
    assert value("bigru_engine_compute_seconds_count") == 2  # one per engine call
    assert value("bigru_queue_wait_seconds_bucket", {"le": "0.2"}) == 1  # the first did not wait
    assert value("bigru_queue_wait_seconds_sum") >= 2 * hold * 0.9
    assert value("bigru_engine_compute_seconds_bucket", {"le": "0.2"}) == 1  # the held call took long
    # the held call's compute, not the queued ones' waits too (they would add 2 x hold)
    assert hold * 0.9 <= value("bigru_engine_compute_seconds_sum") < held[0] + 0.2
    assert value("bigru_engine_batch_sequences_count") == 2
    assert value("bigru_engine_batch_sequences_sum") == 3
    assert [(stats.jobs, stats.sequences) for stats in calls] == [(1, 1), (2, 2)]


def test_an_engine_failure_fails_its_callers_and_the_batcher_goes_on(
    model: tuple[NativeModel, ModelSpec],
) -> None:
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        with pytest.raises(Exception, match=r"out of range|indices|idx"):
            await batcher.submit([np.array([VOCAB + 5], np.int32)])  # the engine refuses this id
        assert len(await batcher.submit([tokens(3, 4)])) == 1

    with_batcher(scenario, model[1])


def test_waiting_work_is_shared_between_idle_workers(model: tuple[NativeModel, ModelSpec]) -> None:
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        jobs = [asyncio.ensure_future(batcher.submit([tokens(seed, 5)])) for seed in range(60, 64)]
        await eventually(lambda: engine.started == 2)  # both workers busy at once
        engine.gate.set()
        await asyncio.gather(*jobs)

    calls = with_batcher_calls(scenario, model[1], workers=2)
    assert sorted(len(call) for call in calls) in ([1, 3], [2, 2], [1, 1, 2], [1, 1, 1, 1])
    assert sum(len(call) for call in calls) == 4


def test_close_finishes_every_queued_job(model: tuple[NativeModel, ModelSpec]) -> None:
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        jobs = [asyncio.ensure_future(batcher.submit([tokens(seed, 5)])) for seed in range(70, 74)]
        await eventually(lambda: engine.started == 1)
        engine.gate.set()
        await batcher.close()
        assert all(job.done() and len(job.result()) == 1 for job in jobs)

    with_batcher(scenario, model[1])


def test_a_lone_request_waits_up_to_max_delay_for_company(model: tuple[NativeModel, ModelSpec]) -> None:
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        first = asyncio.ensure_future(batcher.submit([tokens(80, 5)]))
        await asyncio.sleep(0.05)  # well inside MAX_QUEUE_DELAY_MS
        await asyncio.gather(first, batcher.submit([tokens(81, 5)]))

    calls = with_batcher_calls(scenario, model[1], max_delay_s=0.5)
    assert [len(call) for call in calls] == [2]  # one engine call for both


def test_a_full_batch_does_not_wait(model: tuple[NativeModel, ModelSpec]) -> None:
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        full = [tokens(82, 5), tokens(83, 5)]  # max_batch_size sequences: nothing to wait for
        assert len(await asyncio.wait_for(batcher.submit(full), timeout=2.0)) == 2

    with_batcher(scenario, model[1], max_batch_size=2, max_delay_s=10.0)


def test_a_worker_that_finds_the_queue_empty_keeps_working(model: tuple[NativeModel, ModelSpec]) -> None:
    """With a delay, both idle workers wake for one job and one of them finds nothing: it
    must go back to waiting, or the service would lose a worker for good."""
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        await batcher.submit([tokens(84, 5)])
        await asyncio.sleep(0.1)
        engine.gate.clear()
        jobs = [asyncio.ensure_future(batcher.submit([tokens(seed, 5)] * 2)) for seed in (85, 86)]
        await eventually(lambda: engine.started == 3)  # both workers busy again
        engine.gate.set()
        await asyncio.gather(*jobs)

    with_batcher(scenario, model[1], workers=2, max_batch_size=2, max_delay_s=0.05)


def test_a_batcher_never_started_closes(model: tuple[NativeModel, ModelSpec]) -> None:
    """What shutdown does after a failed self-check: the batcher exists, its loops never ran."""
    async def main() -> None:
        runner = Runner(OnnxRuntimeEngine(model[1], threads=1), length_buckets(64), 8)
        await asyncio.wait_for(MicroBatcher(runner, 2, 8, 0.0, 16).close(), timeout=5)

    asyncio.run(main())


def test_a_streamed_request_gets_each_parts_results_in_order_and_a_dropped_stream_stops(
    model: tuple[NativeModel, ModelSpec],
) -> None:
    """Parts are computed in order, at most LOOKAHEAD (3) at once; the queue bound applies to
    the first part; a consumer that stops (a client gone) leaves its later parts unrun."""
    native = model[0]
    parts = [[tokens(200 + i, 3 + i), tokens(300 + i, 2)] for i in range(5)]

    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        with pytest.raises(QueueFull):
            await asyncio.wait_for(batcher.stream([[tokens(1, 2)] * 5]).__anext__(), 1.0)
        whole = [results async for results in batcher.stream([[tokens(1, 2)] * 4])]  # exactly the bound
        assert [len(results) for results in whole] == [4]
        got = [results async for results in batcher.stream(parts)]
        assert len(got) == len(parts)
        for part, results in zip(parts, got):
            assert len(results) == len(part)
            for sequence, (outputs, _) in zip(part, results):
                np.testing.assert_allclose(outputs, native.outputs(sequence), atol=1e-5)
        engine.gate.clear()
        stream = batcher.stream(parts)
        first = asyncio.ensure_future(stream.__anext__())
        await eventually(lambda: engine.started >= 1)
        engine.gate.set()
        await first
        await eventually(lambda: batcher.pending == 0)
        await stream.aclose()  # parts 0-2 were taken (the first and its lookahead), not 3 and 4
        await asyncio.sleep(0.05)

    calls = with_batcher_calls(scenario, model[1], max_queue=4)
    ran = [sequence for call in calls for sequence in call]
    streamed_twice = [tuple(parts[i][0].tolist()) for i in range(5)]
    assert [ran.count(s) for s in streamed_twice] == [2, 2, 2, 1, 1]
    assert sum(len(call) for call in calls) == 4 + 10 + 6  # nothing else ran


def test_one_engine_call_takes_jobs_up_to_max_batch_tokens(model: tuple[NativeModel, ModelSpec]) -> None:
    """Waiting jobs are combined into one call up to MAX_BATCH_TOKENS tokens, exactly at the
    bound; the rest waits for the next call."""
    jobs_per_call: list[int] = []

    async def main() -> None:
        engine = GatedEngine(OnnxRuntimeEngine(model[1], threads=1))
        runner = Runner(engine, length_buckets(64), 8, max_batch_tokens=20)  # type: ignore[arg-type]
        batcher = MicroBatcher(runner, 1, 8, 0.0, 64)
        batcher.on_batch.append(lambda stats: jobs_per_call.append(stats.jobs))
        batcher.start()
        try:
            engine.gate.clear()
            first = asyncio.ensure_future(batcher.submit([tokens(1, 3)]))
            await eventually(lambda: engine.started == 1)
            waiting = [asyncio.ensure_future(batcher.submit([tokens(i, 5)])) for i in range(2, 7)]
            await eventually(lambda: batcher.pending == 5)
            engine.gate.set()
            results = await asyncio.gather(first, *waiting)
            assert [len(r) for r in results] == [1] * 6
        finally:
            engine.gate.set()
            await batcher.close()

    asyncio.run(main())
    assert jobs_per_call == [1, 4, 1]  # 4 x 5 = 20 tokens: exactly the bound


async def streamed(batcher: MicroBatcher, parts: list[list[np.ndarray]]) -> list[list]:
    return [results async for results in batcher.stream(parts)]


def test_a_small_call_with_nothing_else_to_do_runs_on_the_event_loop(
    model: tuple[NativeModel, ModelSpec],
) -> None:
    """At most IN_PLACE_TOKENS padded tokens, nothing queued, running or arriving: the loop's
    own thread runs the call. Larger calls, several requests at once, a busy engine, or a
    MAX_QUEUE_DELAY_MS to wait for company: the engine threads."""
    native, spec = model
    where: dict[str, list[bool]] = {}
    observed: list[BatchStats] = []

    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        loop_thread = threading.get_ident()
        batcher.on_batch.append(observed.append)

        def ran_in_place(since: int) -> list[bool]:
            return [thread == loop_thread for thread in engine.threads[since:]]

        lone = streamed(batcher, [[tokens(1, 4), tokens(2, 2)]])  # 2 x 4 = 8 tokens
        (results,) = await asyncio.wait_for(lone, 0.5)  # one turn of the loop, not a wait
        np.testing.assert_allclose(results[0][0], native.outputs(tokens(1, 4)), atol=1e-5)
        where["lone"] = ran_in_place(0)
        (stats,) = observed
        assert (stats.jobs, stats.sequences, stats.queue_wait_s) == (1, 2, [0.0])
        assert 0 < stats.compute_s < 0.5
        await streamed(batcher, [[tokens(3, 9)]])
        where["larger"] = ran_in_place(1)
        await asyncio.gather(streamed(batcher, [[tokens(4, 3)]]), streamed(batcher, [[tokens(5, 3)]]))
        where["together"] = sorted(set(ran_in_place(2)))  # one call or two
        calls = len(engine.threads)
        engine.gate.clear()
        busy = asyncio.ensure_future(streamed(batcher, [[tokens(6, 9)]]))
        await eventually(lambda: engine.started == calls + 1)
        queued = asyncio.ensure_future(streamed(batcher, [[tokens(7, 3)]]))
        await eventually(lambda: batcher.pending == 1)
        engine.gate.set()
        await asyncio.gather(busy, queued)
        where["busy"] = ran_in_place(calls)

    with_batcher(scenario, spec, in_place_tokens=8)
    assert where == {"lone": [True], "larger": [False], "together": [False], "busy": [False, False]}

    async def waiting(batcher: MicroBatcher, engine: GatedEngine) -> None:
        await streamed(batcher, [[tokens(8, 3)]])
        where["delayed"] = [thread == threading.get_ident() for thread in engine.threads]

    with_batcher(waiting, spec, in_place_tokens=8, max_delay_s=0.01)
    assert where["delayed"] == [False]


def test_once_the_engine_threads_are_done_a_lone_small_call_runs_in_place_again(
    model: tuple[NativeModel, ModelSpec],
) -> None:
    """A thread counts as idle again before its requests hear back, so the next lone small
    call finds the engine idle."""
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        for _ in range(2):
            await asyncio.gather(*(streamed(batcher, [[tokens(seed, 9)]]) for seed in range(4)))
            calls = len(engine.threads)
            await streamed(batcher, [[tokens(9, 3)]])
            assert engine.threads[calls:] == [threading.get_ident()]

    with_batcher(scenario, model[1], workers=2, in_place_tokens=8)


def test_engine_calls_run_on_threads_that_yield_to_the_event_loop(
    model: tuple[NativeModel, ModelSpec],
) -> None:
    """By default (no ``in_place_tokens``) even the smallest call goes to an engine thread,
    whose niceness lets the event loop have a core first."""
    from app.service.batcher import ENGINE_NICENESS

    engine = GatedEngine(OnnxRuntimeEngine(model[1], threads=1))

    async def main() -> None:
        batcher = MicroBatcher(Runner(engine, length_buckets(64), 8), 1, 8, 0.0, 64)  # type: ignore[arg-type]
        batcher.start()
        try:
            await streamed(batcher, [[tokens(9, 1)]])
        finally:
            await batcher.close()

    asyncio.run(main())
    assert engine.threads != [threading.get_ident()]
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert engine.niceness == [ENGINE_NICENESS if base <= ENGINE_NICENESS else base]


def test_close_waits_for_the_running_call_and_the_jobs_behind_it(
    model: tuple[NativeModel, ModelSpec],
) -> None:
    async def scenario(batcher: MicroBatcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        jobs = [asyncio.ensure_future(batcher.submit([tokens(i, 4)])) for i in range(3)]
        await eventually(lambda: engine.started == 1)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
        engine.gate.set()
        await closing
        assert [len(await job) for job in jobs] == [1, 1, 1]

    with_batcher(scenario, model[1], max_batch_size=1)


def test_engine_threads_are_named_daemons_that_outlive_a_closed_loop_quietly(
    model: tuple[NativeModel, ModelSpec],
) -> None:
    """The threads are ``engine_<n>`` (the benchmark's CPU split reads the names) and daemons
    (a process whose batcher was never closed still exits); a call that ends after its event
    loop has closed drops its results without an error."""
    engine = GatedEngine(OnnxRuntimeEngine(model[1], threads=1))
    engine.gate.clear()
    raised: list[BaseException] = []
    previous, threading.excepthook = threading.excepthook, lambda hook: raised.append(hook.exc_value)
    batcher = MicroBatcher(Runner(engine, length_buckets(64), 8), 2, 8, 0.0, 64)  # type: ignore[arg-type]

    waiting: list[asyncio.Future] = []

    async def main() -> None:
        batcher.start()
        waiting.append(asyncio.ensure_future(batcher.submit([tokens(3, 2)])))
        await eventually(lambda: engine.started == 1)

    try:
        asyncio.run(main())
        threads = [t for t in threading.enumerate() if t.name.startswith("engine_")]
        assert sorted(t.name for t in threads)[-2:] == ["engine_0", "engine_1"]
        assert all(t.daemon for t in threads)
        engine.gate.set()
        for _ in range(500):
            if engine.calls:
                break
            threading.Event().wait(0.01)
        threading.Event().wait(0.1)  # the call's results reach the closed loop
        assert engine.calls and not raised
    finally:
        threading.excepthook = previous
