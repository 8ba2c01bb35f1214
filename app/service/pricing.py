"""Memory admission: each request (``/infer``, and the Open Inference Protocol over HTTP and
gRPC: :mod:`app.api.dataplane`) is priced in bytes before it runs, and runs only while the
requests in flight fit in a budget sized from the container.

Where the memory of a replica goes (the default model's figures: docs/memory.md):

- **Baseline**: the process after start-up (Python, ONNX Runtime, the model).
- **Engine calls**: ONNX Runtime holds up to ~8 KiB per padded token while it runs the default
  model (its input projections, every layer's outputs, their transposes); that is
  ``ENGINE_BYTES_PER_STATE_FLOAT`` = 16 bytes for each of the 512 state floats
  (sum over layers of directions x units) per token. An engine call holds at most
  ``MAX_BATCH_TOKENS`` padded tokens and ``WORKERS`` calls run at once, so the engines
  together need at most ``workers x max_batch_tokens x bytes per token``: reserved up front
  (and in a container, fewer calls run at once if that would take over half the memory).
- **Requests** (what admission prices, :meth:`CostModel.price`):

  - the input: the body, its parsed JSON and validated copy, the token arrays:
    ``body bytes + INPUT_BYTES_PER_TOKEN x tokens``;
  - the results of the parts in flight (:func:`split_parts`: a request runs part by part,
    ``LOOKAHEAD`` parts at a time, and each part's results are released once sent):
    ``(output width + hidden width) x 4`` bytes per padded token;
  - what the answer holds until its end (:class:`Held`), in bytes per token: with
    ``return_hidden``, every sequence's output rows, kept for the end of the document (the
    hidden states stream first): ``output width x 4``; an answer built whole (a gRPC message,
    a v2 JSON header that must precede binary data) holds every output float in each form it
    takes at once (``WHOLE_MESSAGE_BYTES_PER_FLOAT``, ``JSON_BYTES_PER_FLOAT``);
  - the JSON being sent: chunks of about 64 KiB (``ENCODING_BYTES`` covers the one being
    built and the one in the socket's buffer).

The budget: ``MEMORY_BUDGET_BYTES`` when set; else, in a container with a memory limit,
``limit - RSS at ready - headroom (10% of the limit, at least 32 MiB) - engine reserve``;
else ``DEFAULT_BUDGET``. An eighth of it is the waiting room: requests waiting for room
hold only their input, and when the waiting room is full they get ``503`` at once. A
request that costs more than the other seven eighths can never run: ``413``.

With several models (:mod:`app.service.repository`) the budget is one for all. A model
loaded after start-up takes its resident size and its engine calls' reserve out of a derived
budget (:meth:`MemoryBudget.reserve`), waiting for requests in flight to leave room, and
gives them back when it is unloaded; one that can never fit is refused, never an OOM.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from app.engine.buckets import bucket_of
from app.system import MiB, cgroup_memory_limit, process_rss

DEFAULT_BUDGET = 1024 * MiB

ENGINE_BYTES_PER_STATE_FLOAT = 16
# A conversion's child process (TensorFlow) at its peak, as the container's cgroup counts it
# (docs/models.md: 305 MiB converting the default model in a 512 MiB container).
CONVERSION_BYTES = 320 * MiB
INPUT_BYTES_PER_TOKEN = 64  # list slot + validated copy + float64 + int32, with slack
ENCODING_BYTES = 4 * 64 * 1024  # app/api/streaming.py's chunk being built, and the one being sent
LOOKAHEAD = 3  # parts of one request held at once: one being sent while two compute
FLOAT_BYTES = 4  # a float32 result, or one value of a binary (raw little-endian) answer
JSON_BYTES_PER_FLOAT = 16  # one value of a JSON answer: "-1.2345678e-05," is 15 characters
# A unary gRPC answer is one message, built whole: the padded float32 tensor, the serialized
# message and gRPC core's copy of it; priced at four copies (measured in docs/memory.md).
WHOLE_MESSAGE_BYTES_PER_FLOAT = 4 * FLOAT_BYTES


def split_parts(lengths: Sequence[int], buckets: list[int], max_tokens: int,
                max_sequences: int) -> list[range]:
    """Consecutive runs of sequences of at most ``max_tokens`` padded tokens (each length
    rounded up to its bucket) and ``max_sequences`` sequences; a longer sequence goes alone."""
    parts, start, tokens = [], 0, 0
    for index, length in enumerate(lengths):
        padded = bucket_of(buckets, length)
        if index > start and (tokens + padded > max_tokens or index - start >= max_sequences):
            parts.append(range(start, index))
            start, tokens = index, 0
        tokens += padded
    parts.append(range(start, len(lengths)))
    return parts


@dataclass(frozen=True)
class Cost:
    """What one request holds: ``input`` from the start, ``total`` once admitted."""

    input: int
    total: int


@dataclass(frozen=True)
class Held:
    """What an answer holds until its end, beyond the parts in flight: ``bytes_per_token`` for
    each token of each sequence; ``steps``: every sequence counts as ``steps`` tokens (a v2
    tensor, each row padded to the widest), else as its own length rounded up to its bucket."""

    bytes_per_token: float = 0
    steps: int | None = None


NOTHING_HELD = Held()


@dataclass(frozen=True)
class CostModel:
    buckets: list[int]
    output_width: int
    hidden_width: int
    state_floats: int  # sum over recurrent layers of directions x units x states (h; h and c)
    max_batch_tokens: int
    max_batch_size: int

    @property
    def engine_bytes_per_token(self) -> int:
        return ENGINE_BYTES_PER_STATE_FLOAT * self.state_floats

    def engine_reserve(self, workers: int) -> int:
        """What ``workers`` engine calls of ``max_batch_tokens`` padded tokens hold at once."""
        return workers * self.max_batch_tokens * self.engine_bytes_per_token

    def parts(self, lengths: Sequence[int]) -> list[range]:
        return split_parts(lengths, self.buckets, self.max_batch_tokens, self.max_batch_size)

    def kept_outputs(self, return_hidden: bool) -> Held:
        """``/infer``'s: with ``return_hidden`` the output rows wait for the hidden states."""
        return Held(FLOAT_BYTES * self.output_width) if return_hidden else NOTHING_HELD

    def price(self, lengths: Sequence[int], held: Held, body_bytes: int) -> Cost:
        """The input, the results of ``LOOKAHEAD`` parts in flight, what the answer ``held``
        until its end, and the chunks being encoded and sent."""
        padded = [bucket_of(self.buckets, length) for length in lengths]
        part_tokens = [sum(padded[i] for i in part) for part in self.parts(lengths)]
        in_flight = max(sum(part_tokens[i:i + LOOKAHEAD]) for i in range(len(part_tokens)))
        result_bytes = FLOAT_BYTES * (self.output_width + self.hidden_width)
        input_bytes = body_bytes + INPUT_BYTES_PER_TOKEN * sum(lengths)
        held_tokens = sum(padded) if held.steps is None else held.steps * len(lengths)
        held_bytes = int(held.bytes_per_token * held_tokens)
        return Cost(input_bytes, input_bytes + result_bytes * in_flight + held_bytes + ENCODING_BYTES)


class NeverFits(Exception):
    """The request costs more than the whole budget."""


class BudgetTaken(Exception):
    """No room now, and no room to wait (or the wait ran out)."""


class MemoryBudget:
    """Bytes that admitted requests may hold; FIFO waiting for room, bounded in bytes too."""

    def __init__(self, total: int, derivation: str, limit: int | None = None) -> None:
        total = max(total, 0)
        self.limit = limit  # the cgroup limit it was derived from; None: configured or default
        self.waiting_room = total // 8  # inputs of requests waiting for room
        self.total = total - self.waiting_room  # what admitted requests hold
        self.derivation = derivation
        self.used = 0
        self.waiting = 0
        self._line: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def admit(self, cost: Cost, timeout_s: float) -> None:
        """Return once ``cost.total`` is reserved (release it with :meth:`release`)."""
        if cost.total > self.total:
            raise NeverFits
        if not self._line and self.used + cost.total <= self.total:
            self.used += cost.total
            return
        if self.waiting + cost.input > self.waiting_room:
            raise BudgetTaken
        turn = asyncio.get_running_loop().create_future()
        self._line.append((cost.total, turn))
        self.waiting += cost.input
        try:
            await asyncio.wait_for(turn, timeout_s)
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self.release(cost.total)  # admitted just as the wait ended: give it back
            else:
                turn.cancel()
                self._wake()  # the line's head may have changed
            if isinstance(exc, TimeoutError):
                raise BudgetTaken from None
            raise
        finally:
            self.waiting -= cost.input

    def release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    async def reserve(self, amount: int, timeout_s: float) -> None:
        """Take ``amount`` out of the budget for good (a model loaded after start-up), once the
        requests in flight leave room for it; raises :class:`NeverFits` or :class:`BudgetTaken`."""
        await self.admit(Cost(0, amount), timeout_s)
        self.used -= amount
        self.total -= amount

    def unreserve(self, amount: int) -> None:
        """Give back what :meth:`reserve` took, or what a start-up model held (it is unloaded)."""
        self.total += amount
        self._wake()

    def _wake(self) -> None:
        """Admit from the head of the line while it fits (FIFO: no starving big requests)."""
        while self._line:
            amount, turn = self._line[0]
            if turn.done():
                self._line.popleft()
                continue
            if self.used + amount > self.total:
                return
            self._line.popleft()
            self.used += amount
            turn.set_result(None)

    def describe(self) -> dict:
        return {"memory_budget_bytes": self.total + self.waiting_room,
                "memory_budget_from": self.derivation, "largest_request_cost_bytes": self.total,
                "waiting_room_bytes": self.waiting_room}


def sized_budget(configured: int | None,
                 engines: Sequence[tuple[int, int]]) -> tuple[MemoryBudget, list[int]]:
    """The budget, and how many engine calls of each model (``engines``: its wanted calls at
    once and the bytes of one call) may run at once.

    ``MEMORY_BUDGET_BYTES`` when set; else derived from the container's limit (call this once
    the start-up models are ready: the RSS then is the baseline), the engine calls taking at
    most half of what is left (so many cores and little memory mean fewer parallel calls, not
    an OOM); else :data:`DEFAULT_BUDGET`."""
    workers = [wanted for wanted, _ in engines]
    if configured is not None:
        return MemoryBudget(configured, "MEMORY_BUDGET_BYTES"), workers
    limit = cgroup_memory_limit()
    if limit is None:
        return MemoryBudget(DEFAULT_BUDGET, "default (no cgroup memory limit)"), workers
    baseline, headroom = process_rss(), headroom_of(limit)
    available = limit - baseline - headroom
    workers = affordable_calls(engines, available // 2)
    reserve = sum(calls * per_call for calls, (_, per_call) in zip(workers, engines))
    derivation = (f"cgroup limit {limit / MiB:.0f} MiB - RSS at ready {baseline / MiB:.0f} MiB - "
                  f"headroom {headroom / MiB:.0f} MiB - {sum(workers)} engine calls {reserve / MiB:.0f} MiB")
    return MemoryBudget(available - reserve, derivation, limit=limit), workers


def headroom_of(limit: int) -> int:
    return max(limit // 10, 32 * MiB)


def affordable_calls(engines: Sequence[tuple[int, int]], room: int) -> list[int]:
    """Engine calls per model, at least one each, fewer (the most costly first) while they
    would hold more than ``room``."""
    workers = [wanted for wanted, _ in engines]
    costs = [per_call for _, per_call in engines]
    while sum(calls * cost for calls, cost in zip(workers, costs)) > room:
        shrinkable = [index for index, calls in enumerate(workers) if calls > 1]
        if not shrinkable:
            break
        index = max(shrinkable, key=lambda i: workers[i] * costs[i])
        workers[index] -= 1
    return workers
