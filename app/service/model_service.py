"""One version of one model: convert -> load -> self-check -> warm up -> serve -> unload.

:class:`~app.service.repository.Repository` brings each version up while the server answers
``/healthz`` (and reports the stage), through:

1. ``converting``: the source (``MODEL_PATH``, or a version directory of ``MODEL_REPOSITORY``)
   becomes a Keras 3 model saved by Keras and checked by Keras against the parity data, in a
   child process, or is found converted already (:mod:`app.convert.cache`); this process never
   imports TensorFlow for it;
2. ``loading``: the saved ``.keras`` file is read back (h5py, no Keras) into the spec the
   engine is lowered from;
3. ``self-check``: the Keras model's own check is held to our tolerance, then the engine is
   checked against the parity data (GPU outputs) and against the Keras model's outputs;
4. ``warm-up``, then ``ready`` once the repository gives it its engine calls
   (:meth:`ModelService.start`);
5. ``unloading`` once another version replaces it or it is unloaded: requests already holding
   it (a :class:`Lease`) finish on it, then its batcher stops and its memory is given back.

A source that can't be converted raises :class:`~app.errors.ModelError` from :meth:`load`
naming the file and the problem; a failed check leaves the version ``failed`` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import platform
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app import __version__
from app.config import Settings
from app.convert.cache import Resolved, resolve
from app.engine.buckets import length_buckets
from app.engine.engine_choice import EngineChoice, choose_engine
from app.engine.runner import Result, Runner
from app.engine.selfcheck import SelfCheck, run_self_check, tolerance_for
from app.formats.bundle import ModelBundle, load_bundle
from app.formats.parity import ParityData
from app.observability import Metrics
from app.service.batcher import MicroBatcher
from app.service.pricing import CostModel, MemoryBudget
from app.spec import ModelInput

log = logging.getLogger("app.service")

LOADING, READY, UNLOADING, UNAVAILABLE = "LOADING", "READY", "UNLOADING", "UNAVAILABLE"


@dataclass
class Status:
    # starting -> converting -> loading -> self-check -> warm-up -> ready -> unloading -> unloaded
    # | failed; the server's draining shows here too (requests are still answered)
    stage: str = "starting"
    detail: str | None = None  # the conversion's current step
    ready: bool = False
    error: str | None = None
    started_at: float = field(default_factory=time.perf_counter)
    seconds_to_ready: float | None = None


class ModelService:
    def __init__(self, name: str, version: int, source: Path, settings: Settings, metrics: Metrics) -> None:
        self.name, self.version, self.source_path = name, version, source
        self.settings = settings
        self.metrics = metrics
        self.labels = (name, str(version))
        self.status = Status()
        self.resolved: Resolved | None = None
        self.bundle: ModelBundle | None = None
        self.runner: Runner | None = None
        self.batcher: MicroBatcher | None = None
        self.keras_check: SelfCheck | None = None  # the Keras model vs the parity data
        self.self_check: SelfCheck | None = None  # the engine vs the parity data
        self.engine_vs_keras: SelfCheck | None = None  # the engine vs the Keras model's outputs
        self.engine_choice: EngineChoice | None = None
        self.costs: CostModel | None = None  # memory admission prices its requests with it
        self.budget: MemoryBudget | None = None  # the server's, once started
        self.held_bytes = 0  # its resident memory (measured at load) and engine calls' reserve
        # What its unloading gives back to the budget: what it took out; a start-up version's
        # resident memory stays in the baseline (it may hold libraries loaded once for all).
        self.reserved_bytes = 0
        self.unreadable = False  # its source could not be converted or read (ModelError)
        self.users = 0  # requests holding it (leases): it is unloaded once none is left
        self._unused: asyncio.Event | None = None
        self._info: tuple[str, ...] = ()  # its bigru_model_info labels
        self._failed_metadata: dict | None = None

    @property
    def state(self) -> str:
        """The repository's word for the stage: LOADING, READY, UNLOADING or UNAVAILABLE."""
        stage = self.status.stage
        if stage in ("ready", "draining"):
            return READY
        if stage == "unloading":
            return UNLOADING
        return UNAVAILABLE if stage in ("failed", "unloaded") else LOADING

    @property
    def reason(self) -> str | None:
        return self.status.error if self.status.stage == "failed" else (
            "unloaded" if self.status.stage == "unloaded" else None)

    def load(self) -> ModelBundle:
        """Find or make the Keras conversion and read it; raises :class:`~app.errors.ModelError`."""
        settings = self.settings
        self.status.stage = "converting"
        self.resolved = resolve(self.source_path, settings.model_cache_dir, settings.convert_timeout_s,
                                self._conversion_step)
        self._log_resolved(self.resolved)
        self.status.stage, self.status.detail = "loading", None
        self.bundle = load_bundle(self.resolved.directory)
        source = self.source
        log.info("model loaded: %s version %d (%s, %s) as %s", self.name, self.version, source["format"],
                 source["conversion"], self.bundle.spec.source.path,
                 extra={"model": self.name, "version": self.version, "format": source["format"],
                        "conversion": source["conversion"], "path": source["path"],
                        "keras_file": self.bundle.spec.source.path})
        return self.bundle

    def _conversion_step(self, step: str, message: str) -> None:
        self.status.detail = message
        log.info("converting: %s", message, extra={"step": step, "model": self.name, "version": self.version})

    def _log_resolved(self, resolved: Resolved) -> None:
        extra = {"how": resolved.how, "directory": str(resolved.directory), "model": self.name,
                 "version": self.version, **resolved.conversion}
        if resolved.conversion:
            log.info("converted in %.1f s, peak RSS %.0f MiB: %s", resolved.conversion["seconds"],
                     resolved.conversion["peak_rss_mib"], resolved.directory, extra=extra)
        else:
            log.info("%s, no conversion: %s", resolved.how, resolved.directory, extra=extra)

    @property
    def source(self) -> dict[str, object]:
        """What the source holds: the original file, even when a cached conversion serves it."""
        assert self.bundle is not None and self.resolved is not None
        spec, bundle = self.bundle.spec, self.bundle
        if self.resolved.how == "converted directory" or not bundle.converted_from:
            return {"path": spec.source.path, "format": spec.source.format,
                    "conversion": spec.source.conversion, "keras_version": spec.source.keras_version,
                    "converted_from": bundle.converted_from}
        return {**bundle.converted_from, "converted_from": None}

    def fail(self, error: str, unreadable: bool = False) -> None:
        """``unreadable``: its source could not be converted or read (a ModelError)."""
        self.status.stage, self.status.error, self.status.ready = "failed", error, False
        self.unreadable = unreadable
        extra = {"model": self.name, "version": self.version}
        if unreadable:
            log.error("cannot serve %s: %s", self.source_path, error, extra=extra)
        else:
            log.error("model %s version %d not ready: %s", self.name, self.version, error, extra=extra)

    async def prepare(self) -> bool:
        """Engine, self-checks, warm-up; False (and ``failed``, with the reason) when one fails."""
        try:
            await self._prepare()
        except Exception as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
            return False
        return True

    def start(self, budget: MemoryBudget, workers: int) -> None:
        """Serve: ``workers`` engine calls at once, requests admitted in ``budget``."""
        assert self.runner is not None
        settings = self.settings
        self.budget = budget
        self.batcher = MicroBatcher(self.runner, workers, settings.max_batch_size,
                                    settings.max_queue_delay_ms / 1000, settings.max_queue,
                                    settings.in_place_tokens)
        self.batcher.on_batch.append(lambda stats: self.metrics.observe_batch(stats, *self.labels))
        self.metrics.queue_depth.labels(*self.labels).set_function(
            lambda: self.batcher.pending if self.batcher else 0)
        self.batcher.start()
        self.status.seconds_to_ready = time.perf_counter() - self.status.started_at
        self.status.stage, self.status.ready = "ready", True
        self.metrics.model_ready.labels(*self.labels).set(1)
        log.info("%s version %d ready in %.2f s", self.name, self.version, self.status.seconds_to_ready,
                 extra={"model": self.name, "version": self.version,
                        "seconds_to_ready": round(self.status.seconds_to_ready, 3)})

    @property
    def model_input(self) -> ModelInput:
        """What a request carries per step: token ids or feature vectors (see app.api.inputs)."""
        assert self.bundle is not None
        return self.bundle.spec.input

    @property
    def accepting(self) -> bool:
        """Whether requests are served: once ready, on through draining and unloading."""
        return self.status.stage in ("ready", "draining", "unloading")

    def drain(self) -> None:
        """Stop reporting ready (shutdown has begun); requests are still answered."""
        if self.status.stage == "ready":
            self.status.stage, self.status.ready = "draining", False

    def lease(self) -> Lease:
        return Lease(self)

    async def unload(self) -> None:
        """Stop taking requests; once the ones holding it are done, stop the batcher and drop
        the engine (its memory goes back with it)."""
        serving = self.batcher is not None
        if serving:
            self.status.stage, self.status.ready = "unloading", False
            log.info("unloading %s version %d: %d requests to finish", self.name, self.version,
                     self.users, extra={"model": self.name, "version": self.version})
            self._unused = asyncio.Event()
            if self.users:
                await self._unused.wait()
            assert self.batcher is not None
            await self.batcher.close()
        if self.status.stage == "failed" and self.bundle is not None:
            self._failed_metadata = self.metadata()  # what failed, and why, stays readable
        self.batcher = self.runner = self.engine_choice = None
        self.bundle = None  # the weights, with the engine: what the version held goes
        if self.status.stage != "failed":
            self.status.stage = "unloaded"
        self._forget_metrics()
        if serving:
            log.info("unloaded %s version %d", self.name, self.version,
                     extra={"model": self.name, "version": self.version})

    def _forget_metrics(self) -> None:
        labelled = [(self.metrics.model_ready, self.labels), (self.metrics.queue_depth, self.labels),
                    (self.metrics.self_check_diff, self.labels), (self.metrics.model_info, self._info)]
        for gauge, labels in labelled:
            if not labels:
                continue  # a version that failed before its info was known has none to forget
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    def _left(self) -> None:
        self.users -= 1
        if self.users == 0 and self._unused is not None:
            self._unused.set()

    async def _prepare(self) -> None:
        # Its engine calls run on a thread that ends with it: what an engine keeps per thread
        # for the next calls (the native engine's scratch) is then kept only by the engine threads.
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        try:
            await self._prepare_on(thread)
        finally:
            thread.shutdown(wait=False)

    async def _prepare_on(self, thread: ThreadPoolExecutor) -> None:
        assert self.bundle is not None
        settings, bundle, spec = self.settings, self.bundle, self.bundle.spec
        loop = asyncio.get_running_loop()
        tolerance = tolerance_for(settings.parity_tolerance, bundle.parity)
        if bundle.keras is not None and bundle.keras.check is not None:
            self.status.stage = "self-check"
            self.keras_check = SelfCheck(**bundle.keras.check.model_dump(), tolerance=tolerance)
            _require(self.keras_check, "the Keras model against the parity data")
        buckets = length_buckets(settings.max_len)
        keras_file = spec.source.path if bundle.keras is not None else None  # the saved Keras model
        self.engine_choice = await loop.run_in_executor(thread, functools.partial(
            choose_engine, settings.engine, spec, settings.threads, buckets, settings.max_batch_size,
            keras_file=keras_file, kept_tokens=settings.max_batch_tokens))
        engine = self.engine_choice.engine
        runner = Runner(engine, buckets, settings.max_batch_size, settings.max_batch_tokens)
        source = self.source
        self._info = (self.name, str(self.version), __version__, str(source["format"]),
                      str(source["conversion"]), engine.name)
        self.metrics.model_info.labels(*self._info).set(1)
        self.status.stage = "self-check"
        if bundle.parity is not None:
            self.self_check = await self._check(bundle.parity, runner, tolerance,
                                                "the engine against the parity data", thread)
        if bundle.keras_outputs is not None:
            self.engine_vs_keras = await self._check(
                bundle.keras_outputs, runner, bundle.keras_outputs.tolerance or tolerance,
                "the engine against the Keras model's outputs", thread)
        checked = self.self_check or self.engine_vs_keras
        if checked is not None:
            self.metrics.self_check_diff.labels(*self.labels).set(checked.worst)
        self.status.stage = "warm-up"
        await loop.run_in_executor(thread, runner.warm_up)
        self.runner = runner
        self.costs = CostModel(
            buckets, spec.output_width, spec.hidden_width, sum(layer.state_floats for layer in spec.layers),
            settings.max_batch_tokens, settings.max_batch_size)

    @property
    def wanted_calls(self) -> int:
        """Engine calls it would run at once, memory allowing."""
        assert self.engine_choice is not None
        return self.settings.workers if self.engine_choice.engine.parallel_calls else 1

    async def _check(self, parity: ParityData, runner: Runner, tolerance: float, what: str,
                     thread: ThreadPoolExecutor) -> SelfCheck:
        """The serving engine against recorded outputs; raises if they differ too much."""
        check = await asyncio.get_running_loop().run_in_executor(
            thread, run_self_check, parity, runner.run, tolerance)
        log.info("self-check %s: %s", "passed" if check.passed else "FAILED", what,
                 extra={"self_check": check.as_dict(), "model": self.name, "version": self.version})
        _require(check, what)
        return check

    def infer_parts(self, parts: list[list[np.ndarray]]) -> AsyncIterator[list[Result]]:
        """Results part by part (see :meth:`MicroBatcher.stream`)."""
        assert self.batcher is not None
        return self.batcher.stream(parts)

    def metadata(self) -> dict:
        status = {"stage": self.status.stage, "detail": self.status.detail, "ready": self.status.ready,
                  "error": self.status.error, "seconds_to_ready": self.status.seconds_to_ready}
        common = {"version": self.version, "state": self.state, "memory_bytes": self.held_bytes,
                  "engine": self.settings.engine,
                  "status": status, "limits": self.limits(), "versions": _versions()}
        if self.bundle is None and self._failed_metadata is not None:
            return self._failed_metadata
        if self.bundle is None:  # still converting, or never loaded
            return {"name": self.name, "source": {"path": str(self.source_path)}, **common}
        spec = self.bundle.spec
        return {
            "name": self.name,
            "source": self.source,
            "architecture": spec.describe(),
            "input": spec.input.describe(),
            "vocab_size": spec.vocab_size,
            "output_width": spec.output_width,
            "keras": self._keras_metadata(),
            "self_check": _as_dict(self.self_check),
            "engine_vs_keras": _as_dict(self.engine_vs_keras),
            **common,
            "engine": self.engine_choice.engine.name if self.engine_choice else self.settings.engine,
            "engine_choice": self.engine_choice.as_dict() if self.engine_choice else None,
        }

    def limits(self) -> dict:
        """What a request may be and hold (published in /v1/model and the OpenAPI text)."""
        settings = self.settings
        limits = {"max_batch": settings.max_batch, "max_len": settings.max_len,
                  "max_body_bytes": settings.max_body_bytes, "max_queue": settings.max_queue,
                  "max_batch_tokens": settings.max_batch_tokens,
                  "request_timeout_s": settings.request_timeout_s,
                  "header_timeout_s": settings.header_timeout_s, "body_timeout_s": settings.body_timeout_s,
                  "send_timeout_s": settings.send_timeout_s,
                  "engine_calls_at_once": self.batcher.workers if self.batcher else None}
        return limits | (self.budget.describe() if self.budget else {})

    def _keras_metadata(self) -> dict | None:
        assert self.bundle is not None and self.resolved is not None
        record = self.bundle.keras
        if record is None:
            return None
        return {"path": self.bundle.spec.source.path, "keras_version": record.keras_version,
                "self_check": _as_dict(self.keras_check),
                "conversion": {"how": self.resolved.how, "cache_key": self.resolved.key, **record.conversion}}


class Lease:
    """A request's hold on the version it was routed to (``with``; :meth:`take` hands it on
    to whatever finishes the request): the version is not unloaded while one is held."""

    def __init__(self, service: ModelService) -> None:
        self.service = service
        service.users += 1
        self._held, self._taken = True, False

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._taken:
            self.release()

    def take(self) -> Lease:
        """The lease, now released by its taker (:meth:`release`), not by the ``with`` block."""
        self._taken = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self.service._left()


def _require(check: SelfCheck, what: str) -> None:
    if not check.passed:
        raise RuntimeError(f"self-check failed: {what}: max abs diff {check.worst:.3g} > tolerance "
                           f"{check.tolerance:g} against {check.reference}")


def _as_dict(check: SelfCheck | None) -> dict | None:
    return None if check is None else check.as_dict()


def _versions() -> dict[str, str]:
    import onnxruntime

    versions = {"service": __version__, "python": platform.python_version(),
                "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for name, package in (("keras", "keras"), ("tensorflow", "tensorflow-cpu"), ("openvino", "openvino")):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(package)
    return versions
