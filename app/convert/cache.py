"""Convert once: converted models kept by the source's content hash in ``MODEL_CACHE_DIR``.

:func:`resolve` turns ``MODEL_PATH`` into a converted directory (:mod:`app.convert.directory`):

- a directory that ``convert`` wrote is served as it is, once its integrity record checks out;
- otherwise the cache entry ``MODEL_CACHE_DIR/<key>`` is used when its integrity record checks
  out, where ``<key>`` hashes the source's bytes (every file of a model directory, or the file,
  or a TF checkpoint's files) with the converter's own code and library versions;
- otherwise (missing, or corrupted: then it is set aside and removed) the conversion runs in a
  child process into ``.tmp-<key>-*`` and is published with one atomic ``rename``.

Replicas sharing the directory take a lock file per key, so one converts while the others wait
and then find the entry; the rename alone keeps the cache consistent should locks not work (a
network filesystem): a loser's rename fails and its copy is dropped. A hit needs no write
access, so a read-only cache filled beforehand (at image build, by an init container) works.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

from app.convert.child import OnStep, convert_in_child
from app.convert.directory import file_sha256, is_converted, verify_integrity
from app.errors import ModelError

log = logging.getLogger("app.convert")

APP_ROOT = Path(__file__).resolve().parent.parent
CONVERTER_CODE = ("spec.py", "errors.py", "formats", "convert")  # what decides a conversion's output
CONVERTER_LIBRARIES = ("keras", "tensorflow-cpu", "tensorflow", "h5py", "numpy", "safetensors")
LOCK_POLL_S = 0.2


@dataclass(frozen=True)
class Resolved:
    """The converted directory to serve, and how it was found."""

    directory: Path
    how: str  # "converted directory" | "cache hit" | "converted" | "reconverted"
    key: str | None = None
    conversion: dict[str, object] = field(default_factory=dict)  # the child's report, when it ran


def resolve(model_path: Path, cache_dir: Path, timeout_s: float, on_step: OnStep) -> Resolved:
    """The converted directory for ``model_path``; raises :class:`ModelError` naming the file."""
    if model_path.is_dir() and is_converted(model_path):
        verify_integrity(model_path)
        return Resolved(model_path, "converted directory")
    key = cache_key(model_path)
    entry = cache_dir / key
    if _problem(entry) is None:
        return Resolved(entry, "cache hit", key)
    with _locked(cache_dir, key, timeout_s, on_step):
        problem = _problem(entry)  # another process may have converted it while we waited
        if problem is None:
            return Resolved(entry, "cache hit", key)
        redo = entry.exists()
        if redo:
            log.warning("cache entry unusable, converting again: %s", problem,
                        extra={"cache_entry": str(entry)})
            _discard(entry, cache_dir, key)
        report = _convert_into(entry, model_path, cache_dir, key, timeout_s, on_step)
    return Resolved(entry, "reconverted" if redo else "converted", key, report)


def needs_conversion(model_path: Path, cache_dir: Path) -> bool:
    """Whether :func:`resolve` would run a conversion (a cheap look: no lock, no child)."""
    if model_path.is_dir() and is_converted(model_path):
        return False
    try:
        return _problem(cache_dir / cache_key(model_path)) is not None
    except ModelError:
        return True  # no such source: resolve says so


def cache_key(model_path: Path) -> str:
    """sha256 of the converter's fingerprint and of every source file's name and bytes."""
    digest = hashlib.sha256(converter_fingerprint().encode())
    base = model_path if model_path.is_dir() else model_path.parent
    for path in source_files(model_path):
        digest.update(f"\0{path.relative_to(base)}\0{file_sha256(path)}".encode())
    return digest.hexdigest()[:32]


def source_files(model_path: Path) -> list[Path]:
    """The files a source consists of: a directory's files (recursively), a file, or the
    ``<prefix>.*`` files of a TF checkpoint prefix."""
    if model_path.is_dir():
        return sorted(p for p in model_path.rglob("*") if p.is_file())
    if model_path.is_file():
        return [model_path]
    shards = sorted(model_path.parent.glob(f"{model_path.name}.*")) if model_path.parent.is_dir() else []
    if not shards:
        raise ModelError(f"{model_path}: no such model file or directory")
    return shards


@cache
def converter_fingerprint() -> str:
    """What else decides a conversion's output: this converter's code and library versions."""
    digest = hashlib.sha256()
    for name in CONVERTER_CODE:
        root = APP_ROOT / name
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(f"{path.relative_to(APP_ROOT)}\0".encode() + path.read_bytes())
    for library in CONVERTER_LIBRARIES:
        with suppress(metadata.PackageNotFoundError):
            digest.update(f"{library}=={metadata.version(library)}\0".encode())
    return digest.hexdigest()


def _problem(entry: Path) -> str | None:
    """Why a cache entry can't be served (None: it can)."""
    if not entry.exists():
        return "missing"
    try:
        verify_integrity(entry)
    except ModelError as exc:
        return str(exc)
    return None


@contextmanager
def _locked(cache_dir: Path, key: str, timeout_s: float, on_step: OnStep) -> Iterator[None]:
    """One converter per key at a time, across processes sharing ``cache_dir``."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(cache_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ModelError(f"MODEL_CACHE_DIR {cache_dir}: cannot convert into it ({exc.strerror}); "
                         "make it writable, or fill it beforehand with `python -m app convert`") from exc
    try:
        deadline = time.monotonic() + timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    on_step("waiting", "another process is converting this model")
                if time.monotonic() > deadline:
                    raise ModelError(f"{cache_dir / key}: another process has been converting it for "
                                     f"longer than CONVERT_TIMEOUT_S={timeout_s:g} s") from None
                time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(lock)  # releases the lock


def _convert_into(entry: Path, model_path: Path, cache_dir: Path, key: str, timeout_s: float,
                  on_step: OnStep) -> dict[str, object]:
    for stale in cache_dir.glob(f".tmp-{key}-*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    temp = cache_dir / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    try:
        report = convert_in_child(model_path, temp, on_step, timeout_s)
        verify_integrity(temp)
        try:
            temp.rename(entry)
        except OSError:
            if _problem(entry) is not None:  # not a valid entry published by another process
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return report


def _discard(entry: Path, cache_dir: Path, key: str) -> None:
    """Move a bad entry out of the way in one step, then delete it."""
    aside = cache_dir / f".corrupt-{key}-{uuid.uuid4().hex[:8]}"
    try:
        entry.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
