"""The request path shared by every protocol (``/infer``, v2 over HTTP, v2 over gRPC): the
body is priced before it is read (:class:`BodyHold`: the bytes and what parsing them holds,
growing with a body of unknown size) and parsed, off the event loop unless it is small
(:func:`parsed`); then the request is priced by what its answer will hold, waits for room in
the memory budget (or is refused), runs part by part, and releases the budget when the
answer is done.

Outcomes are :class:`~app.api.errors.ApiError`; each protocol maps the status to its own form:
``413`` (the request can never fit: the message names the limit and says how to split it or
drop the hidden states), ``503`` with Retry-After (the budget or the queue is taken), ``504``
(no first part within the deadline). gRPC maps them to RESOURCE_EXHAUSTED, UNAVAILABLE and
DEADLINE_EXCEEDED (:mod:`app.api.kserve.grpc_service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends
from starlette.requests import Request

from app.api.errors import ApiError
from app.engine.runner import Result
from app.observability import Metrics
from app.service.batcher import QueueFull
from app.service.model_service import Lease, ModelService
from app.service.pricing import ENCODING_BYTES, BudgetTaken, Cost, Held, MemoryBudget, NeverFits
from app.service.repository import ControlError, NotReady, Repository, UnknownModel
from app.system import MiB

T = TypeVar("T")
UNREAD_BODY_BYTES = 256 * 1024  # a body not read yet: uvicorn's 64 KiB buffer and the socket's
REQUESTS_BEFORE_READY = 1024  # until the budget is sized; /infer answers 503 then anyway
GROWTH_BYTES = 1024 * 1024  # a body of unknown size is priced ahead of what arrived, by this much
LARGE_BODY_BYTES = 1024 * 1024
# Large bodies read (or inflated) at once: each moves up to 256 KiB per turn of the event loop,
# and every turn the probes wait for grows with them.
LARGE_BODIES_AT_ONCE = 2
_large_body_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary())
# Parsing holds the interpreter lock: more threads would add no speed, only longer waits for the loop.
PARSING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body-parsing")
# A body up to this size is parsed on the loop (in at most a few tenths of a millisecond): the trip to
# the parsing thread and back costs more CPU than that (about 0.1 ms), and the lock is held either way.
IN_PLACE_BYTES = 16 * 1024
# Copying is far cheaper than parsing: a message of this many bytes is built in about 20 us.
IN_PLACE_COPY_BYTES = 256 * 1024


def overloaded(metrics: Metrics, reason: str, what: str) -> ApiError:
    """A ``503 overloaded`` with Retry-After, counted under ``reason``: ``what`` is taken."""
    metrics.rejected.labels(reason).inc()
    return ApiError(503, "overloaded", f"{what}; retry shortly", headers={"Retry-After": "1"})


async def off_loop(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on the parsing thread; the caller waits for it even when cancelled,
    so that what it holds is freed before the caller releases its price."""
    future = asyncio.get_running_loop().run_in_executor(PARSING, functools.partial(work, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


async def parsed(work: Callable[..., T], size: int, *args: Any) -> T:
    """``work(*args)`` parsing ``size`` bytes (a body, a message): in place when they are
    few (``IN_PLACE_BYTES``), else on the parsing thread (:func:`off_loop`)."""
    return work(*args) if size <= IN_PLACE_BYTES else await off_loop(work, *args)


async def copied(work: Callable[..., T], size: int, *args: Any) -> T:
    """``work(*args)`` copying ``size`` bytes (an answer's tensors into its message): in place
    when they are few (``IN_PLACE_COPY_BYTES``), else on the parsing thread."""
    return work(*args) if size <= IN_PLACE_COPY_BYTES else await off_loop(work, *args)


class BodyHold:
    """The memory budget's share held for a body being read and parsed (``async with``: freed
    at the end); :meth:`to` raises it, waiting for room up to the request's deadline."""

    def __init__(self, budget: MemoryBudget | None, timeout_s: float, metrics: Metrics) -> None:
        assert budget is not None, "a model is served only once the budget is sized"
        self.budget, self.metrics = budget, metrics
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.held = 0

    async def __aenter__(self) -> BodyHold:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.budget.release(self.held)
        self.held = 0

    @contextlib.asynccontextmanager
    async def large_body_turn(self) -> AsyncIterator[None]:
        """One of the ``LARGE_BODIES_AT_ONCE`` turns to read or inflate a large body, waited
        for up to the request's deadline (then 503)."""
        loop = asyncio.get_running_loop()
        turns = _large_body_turns.setdefault(loop, asyncio.Semaphore(LARGE_BODIES_AT_ONCE))
        try:
            async with asyncio.timeout_at(self.deadline):
                await turns.acquire()
        except TimeoutError:
            raise overloaded(self.metrics, "large_bodies", "too many large bodies arriving") from None
        try:
            yield
        finally:
            turns.release()

    async def to(self, amount: int) -> None:
        more = amount - self.held
        if more <= 0:
            return
        if amount > self.budget.total:
            self.metrics.rejected.labels("over_budget").inc()
            raise ApiError(413, "over_memory_budget", f"reading and parsing this body needs about "
                           f"{amount / MiB:.0f} MiB, more than the {self.budget.total / MiB:.0f} MiB one "
                           "request may hold (MEMORY_BUDGET_BYTES): send smaller requests")
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            await self.budget.admit(Cost(min(more, UNREAD_BODY_BYTES), more), max(remaining, 0))
        except BudgetTaken:
            raise overloaded(self.metrics, "memory_budget", "the memory budget is taken") from None
        self.held = amount


async def read_body(request: Request, hold: BodyHold, price: Callable[[int], int], max_bytes: int) -> bytes:
    """The body, priced (``price``: what a body of so many bytes holds once parsed) before it
    is read: by its Content-Length, else ahead of what has arrived as it grows. A large body
    (or one of unknown size) is read in its turn (:meth:`BodyHold.large_body_turn`)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        await hold.to(price(min(int(declared), max_bytes)))
        if int(declared) < LARGE_BODY_BYTES:
            return await request.body()
        async with hold.large_body_turn():
            return await request.body()
    chunks, size = [], 0
    async with hold.large_body_turn():
        async for chunk in request.stream():
            size += len(chunk)
            if price(size) > hold.held:
                await hold.to(price(min(size + GROWTH_BYTES, max_bytes)))
            chunks.append(chunk)
    return b"".join(chunks)


# Async, so that FastAPI calls it in place: a sync dependency takes a thread-pool round trip.
async def get_repository(request: Request) -> Repository:
    return request.app.state.repository


Models = Annotated[Repository, Depends(get_repository)]


def most_requests(repository: Repository | None, configured: int | None) -> int:
    """``MAX_REQUESTS``, else as many as the budget holds of the cheapest request (its answer
    being encoded and sent)."""
    if configured is not None:
        return configured
    budget = repository.budget if repository is not None else None
    if budget is None:
        return REQUESTS_BEFORE_READY
    return max(16, (budget.total + budget.waiting_room) // ENCODING_BYTES)


def served(repository: Repository, name: str | None, version: str | None = None) -> ModelService:
    """The version serving model ``name`` (None: the default model): 404 when there is no
    such model or version, 503 with Retry-After while it is not ready, 400 when no model is
    the default."""
    try:
        return repository.default() if name is None else repository.serving(name, version)
    except UnknownModel as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    except NotReady as exc:
        raise ApiError(503, "not_ready", str(exc), headers={"Retry-After": "1"}) from None
    except ControlError as exc:
        raise ApiError(400, "no_default_model", str(exc)) from None


@dataclass(frozen=True)
class Pricing:
    """What an answer holds (``held``), what it would hold without the hidden states
    (``without_hidden``, None when it has none), and how the protocol names dropping them."""

    held: Held
    without_hidden: Held | None
    drop_hidden: str  # e.g. "drop return_hidden"


class Admitted:
    """An admitted request: ``parts`` gives every part's results in sequence order (the first
    one already computed); :meth:`finish` (idempotent) drops what is left, frees the budget
    and lets go of the model version (its lease)."""

    def __init__(self, parts: AsyncIterator[list[Result]], count: int, budget: MemoryBudget,
                 cost: Cost, lease: Lease) -> None:
        self._rest, self.count = parts, count
        self._budget, self._cost, self._lease = budget, cost, lease
        self._first: list[Result] | None = None
        self._finished = False

    async def parts(self) -> AsyncIterator[list[Result]]:
        first, self._first = self._first, None
        assert first is not None, "the parts are read once"
        yield first
        del first
        async for results in self._rest:
            yield results

    async def finish(self) -> None:
        self._first = None
        await self._rest.aclose()  # type: ignore[attr-defined]
        self.release()

    def release(self) -> None:
        """Free the budget (once read to the end, the parts hold nothing more)."""
        if not self._finished:
            self._finished = True
            self._budget.release(self._cost.total)
            self._lease.release()


async def admit_and_start(lease: Lease, sequences: list[np.ndarray], pricing: Pricing,
                          body_bytes: int, timeout_s: float, metrics: Metrics) -> Admitted:
    """Admit the request by its memory cost (waiting for room up to ``timeout_s``), start it
    part by part and wait for its first part; the deadline covers admission and that part.
    The returned :class:`Admitted` holds ``lease`` from here on (released when it is done)."""
    lease.take()
    try:
        return await _admit_and_start(lease, sequences, pricing, body_bytes, timeout_s, metrics)
    except BaseException:
        lease.release()
        raise


async def _admit_and_start(lease: Lease, sequences: list[np.ndarray], pricing: Pricing,
                           body_bytes: int, timeout_s: float, metrics: Metrics) -> Admitted:
    service = lease.service
    costs, budget = service.costs, service.budget
    assert costs is not None and budget is not None
    lengths = [len(sequence) for sequence in sequences]
    observe = metrics.sequence_length.labels(*service.labels).observe
    for length in lengths:
        observe(length)
    cost = costs.price(lengths, pricing.held, body_bytes)
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        await budget.admit(cost, timeout_s)
    except NeverFits:
        metrics.rejected.labels("over_budget").inc()
        lighter = pricing.without_hidden
        fits_lighter = lighter is not None and costs.price(lengths, lighter, body_bytes).total <= budget.total
        advice = pricing.drop_hidden if fits_lighter else ""
        raise ApiError(413, "over_memory_budget",
                       over_budget_message(cost, budget, lengths, lighter is not None, advice)) from None
    except BudgetTaken:
        raise overloaded(metrics, "memory_budget", "the memory budget is taken") from None
    parts_of = costs.parts(lengths)
    admitted = Admitted(service.infer_parts([[sequences[i] for i in part] for part in parts_of]),
                        len(parts_of), budget, cost, lease)
    try:
        admitted._first = await within_deadline(anext(admitted._rest),
                                                deadline - asyncio.get_running_loop().time(),
                                                timeout_s, metrics)
    except BaseException:
        await admitted.finish()
        raise
    return admitted


async def within_deadline(work: Awaitable[T], remaining_s: float, timeout_s: float, metrics: Metrics) -> T:
    """``work``'s result, or 503 at once when the queue is full, or 504 past the deadline."""
    try:
        # Unlike wait_for, the work runs up to its first wait even when no time is left: a
        # full queue says so (503) rather than passing for a missed deadline.
        async with asyncio.timeout(max(remaining_s, 0)):
            return await work
    except QueueFull:
        raise overloaded(metrics, "queue_full", "the queue is full") from None
    except TimeoutError:
        metrics.rejected.labels("deadline").inc()
        raise ApiError(504, "deadline_exceeded", f"no result within {timeout_s:g} s") from None


def over_budget_message(cost: Cost, budget: MemoryBudget, lengths: list[int], with_hidden: bool,
                        drop_hidden: str) -> str:
    """What was asked, what it needs, the limit, and what to do (``drop_hidden``: the
    protocol's words for dropping the hidden states, when that alone would make it fit)."""
    what = f"{len(lengths)} sequences, {sum(lengths)} tokens"
    what += ", with hidden states" if with_hidden else ""
    advice = "split it into smaller requests (fewer or shorter sequences)"
    advice += f" or {drop_hidden}" if drop_hidden else ""
    return (f"this request ({what}) needs about {cost.total / MiB:.0f} MiB to answer, more than the "
            f"{budget.total / MiB:.0f} MiB one request may hold (MEMORY_BUDGET_BYTES): {advice}")
