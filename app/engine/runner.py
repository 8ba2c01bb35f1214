"""The one runner: unpadded sequences in, each sequence's own per-step rows out.

A sequence is whatever the model's input takes per step, stacked: ids ``(steps,) int32`` or
feature vectors ``(steps, F) float32``. Sequences are grouped by length bucket so that padding
stays small (a ragged engine, which computes no padding, takes any lengths in one group), at
most ``max_batch_size`` sequences and ``max_batch_tokens`` padded tokens per call, which
bounds the engine's memory per call (:mod:`app.service.pricing`). Each group is right-padded
into the engine's input array (the engines honour the true lengths, so padding never reaches
the backward direction), and every result is sliced back to its sequence's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.engine.buckets import bucket_of
from app.engine.engines import Engine

Result = tuple[np.ndarray, np.ndarray]  # (outputs (len, C), hidden (len, H))


@dataclass
class Runner:
    engine: Engine
    buckets: list[int]
    max_batch_size: int
    max_batch_tokens: int | None = None  # None: no bound

    def run(self, sequences: list[np.ndarray]) -> list[Result]:
        results: list[Result | None] = [None] * len(sequences)
        for group in self._groups(sequences):
            for index, result in zip(group, self._run_group([sequences[i] for i in group])):
                results[index] = result
        return results  # type: ignore[return-value]

    def _groups(self, sequences: list[np.ndarray]) -> list[list[int]]:
        """Indices, shortest first, cut into calls at ``max_batch_size`` sequences, past
        ``max_batch_tokens`` padded tokens and, unless the engine is ragged, at each new
        length bucket."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        ragged = self.engine.ragged
        groups: list[list[int]] = []
        steps = 0  # the current group's padded length
        for index in order:
            length = len(sequences[index])
            padded = length if ragged else bucket_of(self.buckets, length)
            if (not groups or len(groups[-1]) >= self.max_batch_size or (padded != steps and not ragged)
                    or self._too_many_tokens(len(groups[-1]) + 1, padded)):
                groups.append([])
            steps = padded
            groups[-1].append(index)
        return groups

    def _too_many_tokens(self, sequences: int, bucket: int) -> bool:
        limit = self.max_batch_tokens
        return limit is not None and sequences > 1 and sequences * bucket > limit

    def _run_group(self, group: list[np.ndarray]) -> list[Result]:
        lengths = np.array([len(s) for s in group], dtype=np.int32)
        batch, steps = self.engine.pad_shape(len(group), int(lengths.max()))
        inputs = self.engine.input.blank(batch, steps)
        padded_lengths = np.ones(batch, dtype=np.int32)  # filler rows: one padding step each
        padded_lengths[: len(group)] = lengths
        for row, sequence in enumerate(group):
            inputs[row, : len(sequence)] = sequence
        outputs, hidden = self.engine.run(inputs, padded_lengths)
        return [(outputs[row, :length], hidden[row, :length]) for row, length in enumerate(lengths)]

    def warm_up(self) -> int:
        """Run every shape the engine wants warm; returns how many shapes ran."""
        shapes = self.engine.warm_shapes(self.max_batch_size, self.buckets[-1])
        for batch, steps in shapes:
            self.engine.run(self.engine.input.blank(batch, steps), np.full(batch, steps, np.int32))
        return len(shapes)
