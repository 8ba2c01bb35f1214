"""What the operating system tells and allows this process: the container's memory limit
(cgroup v2 or v1), the resident memory, and glibc's policy for returning freed memory."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MiB = 2**20
UNLIMITED = 2**60  # cgroup v1 says "no limit" with a huge number (page-rounded 2**63 - 1)


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup"),
                        membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """The tightest memory limit over this process's cgroup and its ancestors (v2
    ``memory.max``, v1 ``memory.limit_in_bytes``), or None when there is none.

    Inside a container the process's cgroup is usually the root of what it sees; on a host
    (or without a cgroup namespace) it is a path below the root, so the whole path is read."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        limits += _limits_along(base, path, name)
    if not lines:  # no /proc (not Linux): nothing to read
        return None
    real = [limit for limit in limits if limit < UNLIMITED]
    return min(real) if real else None


def _limits_along(base: Path, path: str, name: str) -> list[int]:
    limits, here = [], base
    for part in ["", *Path(path.strip("/")).parts]:
        here = here / part if part else here
        try:
            text = (here / name).read_text().strip()
        except OSError:
            continue
        limits.append(UNLIMITED if text == "max" else int(text))
    return limits


MMAP_THRESHOLD = 8 * MiB


def return_freed_memory() -> None:
    """Make glibc give every block of ``MMAP_THRESHOLD`` or more its own mapping, returned
    when freed.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB),
    so after the first large answer the buffers come from a heap whose freed space fragments
    and stays resident: the memory budget could not count on it. Below 8 MiB (an engine
    call's results on the default model at ``MAX_BATCH_TOKENS``), blocks come from the heap and
    are reused: a fresh mapping costs a page fault per 4 KiB and a shootdown when freed, paid
    by every engine call under load. An operator who sets glibc's own
    ``MALLOC_MMAP_THRESHOLD_`` is left alone (docs/memory.md: figures)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return  # the operator chose
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)


def trim_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim``): after a model is
    unloaded, its freed blocks below the mmap threshold would otherwise stay resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return  # not glibc


def process_rss() -> int:
    """This process's resident memory in bytes."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
