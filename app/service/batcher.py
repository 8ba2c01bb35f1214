"""Dynamic micro-batching: sequences from requests that arrive together run in one call.

Requests append a job to a queue and await it. ``workers`` engine threads take waiting
jobs, run them through the :class:`~app.engine.runner.Runner` and hand each job exactly
its own results back on the event loop. A thread takes its next batch itself as soon as
its call ends, without a turn of the event loop, which may be busy answering the last
batch's requests. A thread takes its fair share of what waits (split between the idle
threads, at most ``max_batch_size`` sequences, always at least one whole job), because on
these CPUs two one-thread engine calls side by side do far more than one call with two
threads or one call with twice the batch. While calls run, new requests
queue up and form the next batches, so batching grows with load by itself; ``max_delay_s``
optionally waits a little for company when the queue is short (0 by default: a lone
request never waits). A call of at most ``in_place_tokens`` padded tokens with nothing else
queued, running or arriving runs on the event loop itself: handing it to an engine thread and
its results back costs two thread wake-ups, about as much as such a call (docs/benchmark.md),
and it holds the loop no longer than a short call. At most ``max_queue`` sequences wait: past
that, :meth:`submit` raises :class:`QueueFull` at once instead of letting latency grow without bound.

:meth:`stream` runs a large request part by part (``LOOKAHEAD`` parts queued at a time),
so that its results are produced about as fast as they are sent and never all held at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from app.engine.runner import Result, Runner
from app.observability import BatchStats
from app.service.pricing import LOOKAHEAD


class QueueFull(Exception):
    """The queue holds ``max_queue`` sequences already; try again shortly."""


@dataclass
class Job:
    sequences: list[np.ndarray]
    future: asyncio.Future[list[Result]]
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        return sum(len(sequence) for sequence in self.sequences)


ENGINE_NICENESS = 10


def _yield_to_the_event_loop() -> None:
    """Engine threads run at a lower priority than the event loop's: under full load the
    kernel gives the loop (probes, admission) the core first. Engine calls let go of the
    interpreter lock, so a waiting engine thread holds nothing the loop needs."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENGINE_NICENESS)


class MicroBatcher:
    def __init__(self, runner: Runner, workers: int, max_batch_size: int, max_delay_s: float,
                 max_queue: int, in_place_tokens: int = 0) -> None:
        self.runner = runner
        self.in_place_tokens = in_place_tokens
        self.max_queue = max_queue
        self.workers = workers
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.on_batch: list[Callable[[BatchStats], None]] = []
        self._queue: deque[Job] = deque()
        self._changed = threading.Condition()  # guards the queue, _waiting, _idle and _stopping
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = workers
        self._stopping = False
        self._waiting = 0  # sequences in the queue
        self._claims = 0  # requests deciding whether to run in place

    @property
    def pending(self) -> int:
        """Sequences waiting for an engine call."""
        return self._waiting

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=self._work, name=f"engine_{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    async def submit(self, sequences: list[np.ndarray]) -> list[Result]:
        """Queue the sequences and wait for their results. Cancelling the wait (a deadline,
        a client gone) drops the job if it has not started."""
        if self._waiting + len(sequences) > self.max_queue:
            raise QueueFull
        return await self._enqueue(sequences)

    async def stream(self, parts: list[list[np.ndarray]]) -> AsyncIterator[list[Result]]:
        """Each part's results, in order, with the next ``LOOKAHEAD - 1`` parts computing
        meanwhile (so at most ``LOOKAHEAD`` parts' results exist at once). Only the first part
        is queued at first, so that other requests' first parts are not queued behind this
        one's lookahead. The queue bound applies to the first part (then the request is
        accepted and runs to its end); closing the iterator drops the parts not started."""
        if self._waiting + len(parts[0]) > self.max_queue:
            raise QueueFull
        if len(parts) == 1 and await self._alone(parts[0]):
            yield self._run_in_place(parts[0])
            return
        pending = deque([self._enqueue(parts[0])])
        following = iter(parts[1:])
        try:
            while pending:
                results = await pending[0]
                pending.popleft()
                while len(pending) < LOOKAHEAD - 1 and (part := next(following, None)) is not None:
                    pending.append(self._enqueue(part))
                yield results
                del results  # released as soon as the consumer drops them too
        finally:
            for future in pending:
                future.cancel()

    async def _alone(self, sequences: list[np.ndarray]) -> bool:
        """Whether this call may run in place: small, and no other work queued, running or
        about to be (requests that arrived in the same loop iteration get one turn to show up,
        and the first of several that decide at once leaves it to the engine threads)."""
        batch, steps = self.runner.engine.pad_shape(len(sequences), max(len(s) for s in sequences))
        small = batch * steps <= self.in_place_tokens
        if not (small and self.max_delay_s == 0 and self._engine_idle()):
            return False
        self._claims += 1
        try:
            await asyncio.sleep(0)
        finally:
            self._claims -= 1
        return self._claims == 0 and self._engine_idle()

    def _engine_idle(self) -> bool:
        return not self._queue and self._idle == self.workers

    def _run_in_place(self, sequences: list[np.ndarray]) -> list[Result]:
        started = time.perf_counter()
        results = self.runner.run(sequences)
        self._observe(BatchStats(1, len(sequences), [0.0], time.perf_counter() - started))
        return results

    def _observe(self, stats: BatchStats) -> None:
        for callback in self.on_batch:
            callback(stats)

    def _enqueue(self, sequences: list[np.ndarray]) -> asyncio.Future[list[Result]]:
        job = Job(sequences, asyncio.get_running_loop().create_future())
        with self._changed:
            self._queue.append(job)
            self._waiting += len(sequences)
            self._changed.notify()
        return job.future

    async def close(self) -> None:
        """Stop the engine threads once every queued job has run."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    # -- on the engine threads -----------------------------------------------------------

    def _work(self) -> None:
        _yield_to_the_event_loop()
        while True:
            with self._changed:
                while not self._queue and not self._stopping:
                    self._changed.wait()
                if not self._queue:
                    return  # stopping, and nothing left to run
            if self.max_delay_s and self._waiting < self.max_batch_size:
                time.sleep(self.max_delay_s)  # a little company for a short queue
            with self._changed:
                jobs = self._take() if self._queue else []  # another thread may have taken it
                if jobs:
                    self._idle -= 1
            if not jobs:
                continue
            try:
                delivery = self._run_batch(jobs)
            finally:  # idle again before the requests hear back: their next call may run in place
                with self._changed:
                    self._idle += 1
            with contextlib.suppress(RuntimeError):  # the loop closed without close(): nobody waits
                self._loop.call_soon_threadsafe(*delivery)  # type: ignore[union-attr]

    def _run_batch(self, jobs: list[Job]) -> tuple[Callable[..., None], *tuple[object, ...]]:
        """One engine call for this thread's share; returns what hands the results (or the
        failure) to their requests on the event loop."""
        started = time.perf_counter()
        sequences = [s for job in jobs for s in job.sequences]
        try:
            results = self.runner.run(sequences)
        except Exception as exc:  # an engine failure fails these jobs, not the service
            return self._fail, jobs, exc
        stats = BatchStats(len(jobs), len(sequences), [started - j.queued_at for j in jobs],
                           time.perf_counter() - started)
        return self._deliver, jobs, results, stats

    def _take(self) -> list[Job]:
        """This thread's share: what waits, split between the idle threads (this one
        included), and no more tokens than one engine call holds (the rest is another
        thread's share)."""
        share = min(self.max_batch_size, -(-self._waiting // max(self._idle, 1)))
        max_tokens = self.runner.max_batch_tokens or float("inf")
        jobs = [self._queue.popleft()]
        count, tokens = len(jobs[0].sequences), jobs[0].tokens
        while (self._queue and count + len(self._queue[0].sequences) <= share
               and tokens + self._queue[0].tokens <= max_tokens):
            job = self._queue.popleft()
            jobs.append(job)
            count, tokens = count + len(job.sequences), tokens + job.tokens
        self._waiting -= count
        return [job for job in jobs if not job.future.done()]  # skip clients that left

    # -- back on the event loop ------------------------------------------------------------

    def _deliver(self, jobs: list[Job], results: list[Result], stats: BatchStats) -> None:
        start = 0
        for job in jobs:
            end = start + len(job.sequences)
            if not job.future.done():  # the client may have gone away
                job.future.set_result(results[start:end])
            start = end
        self._observe(stats)

    @staticmethod
    def _fail(jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)
