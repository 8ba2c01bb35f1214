"""Length buckets: the padded lengths sequences are grouped (and compiled) by."""

from __future__ import annotations

import numpy as np


def length_buckets(max_len: int) -> list[int]:
    """8, 12, 16, 24, 32, 48, ...: each bucket at most 1.5x the one before, up to ``max_len``."""
    buckets, size = [], 8
    while size < max_len:
        buckets += [size, size + size // 2]
        size *= 2
    return sorted({bucket for bucket in buckets if bucket < max_len} | {max_len})


def bucket_of(buckets: list[int], length: int) -> int:
    """The smallest bucket that holds ``length``; past the last bucket (self-check data may
    be longer than ``MAX_LEN``), the length itself."""
    index = int(np.searchsorted(buckets, length))
    return buckets[index] if index < len(buckets) else length
