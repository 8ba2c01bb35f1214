"""Length buckets: the padded lengths sequences are grouped (and compiled) by."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator


def _series() -> Iterator[int]:
    """8, 12, 16, 24, 32, 48, ...: each at most 1.5x the one before."""
    size = 8
    while True:
        yield size
        yield size + size // 2
        size *= 2


def length_buckets(max_len: int) -> list[int]:
    """The series up to ``max_len``, and ``max_len`` itself."""
    return [*itertools.takewhile(lambda bucket: bucket < max_len, _series()), max_len]


def bucket_of(buckets: list[int], length: int) -> int:
    """The smallest bucket that holds ``length``; past the last bucket (self-check data may
    be longer than ``MAX_LEN``), the series goes on: a compiling engine then compiles a
    few shapes for the self-check, not one per length."""
    index = bisect.bisect_left(buckets, length)  # numpy's searchsorted copies the list per call
    if index < len(buckets):
        return buckets[index]
    return next(bucket for bucket in _series() if bucket >= length)
