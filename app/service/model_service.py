"""The model service: convert -> load -> build engine -> self-check -> warm up -> ready.

The server answers ``/healthz`` (and ``/readyz``: 503 with the stage) from the start, while:

1. ``converting``: ``MODEL_PATH`` becomes a Keras 3 model saved by Keras and checked by Keras
   against the parity data, in a child process, or is found converted already
   (:mod:`app.convert.cache`); this process never imports TensorFlow for it;
2. ``loading``: the saved ``.keras`` file is read back (h5py, no Keras) into the spec the
   engine is lowered from;
3. ``self-check``: the Keras model's own check is held to our tolerance, then the engine is
   checked against the parity data (GPU outputs) and against the Keras model's outputs;
4. ``warm-up``, then ``ready``.

A source that can't be converted (a :class:`~app.errors.ModelError` in 1 or 2) stops start-up
with a message naming the file and the problem; a failed check leaves the service up and
not ready (or exits with ``EXIT_ON_FAILURE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from app import __version__
from app.config import Settings
from app.convert.cache import Resolved, resolve
from app.convert.child import stop_conversions
from app.engine.buckets import length_buckets
from app.engine.engine_choice import EngineChoice, choose_engine
from app.engine.runner import Result, Runner
from app.engine.selfcheck import SelfCheck, run_self_check, tolerance_for
from app.formats.bundle import ModelBundle, load_bundle
from app.formats.parity import ParityData
from app.observability import Metrics
from app.service.batcher import MicroBatcher
from app.service.pricing import CostModel, MemoryBudget, sized_budget
from app.spec import ModelInput

log = logging.getLogger("app.service")


@dataclass
class Status:
    # starting -> converting -> loading -> self-check -> warm-up -> ready | failed | draining
    stage: str = "starting"
    detail: str | None = None  # the conversion's current step
    ready: bool = False
    error: str | None = None
    started_at: float = field(default_factory=time.perf_counter)
    seconds_to_ready: float | None = None


class ModelService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status = Status()
        self.resolved: Resolved | None = None
        self.bundle: ModelBundle | None = None
        self.batcher: MicroBatcher | None = None
        self.keras_check: SelfCheck | None = None  # the Keras model vs the parity data
        self.self_check: SelfCheck | None = None  # the engine vs the parity data
        self.engine_vs_keras: SelfCheck | None = None  # the engine vs the Keras model's outputs
        self.engine_choice: EngineChoice | None = None
        self.costs: CostModel | None = None  # set once ready: memory admission prices with it
        self.budget: MemoryBudget | None = None

    def load(self) -> ModelBundle:
        """Find or make the Keras conversion and read it; raises :class:`~app.errors.ModelError`."""
        settings = self.settings
        self.status.stage = "converting"
        self.resolved = resolve(settings.model_path, settings.model_cache_dir, settings.convert_timeout_s,
                                self._conversion_step)
        self._log_resolved(self.resolved)
        self.status.stage, self.status.detail = "loading", None
        self.bundle = load_bundle(self.resolved.directory)
        source = self.source
        log.info("model loaded: %s (%s, %s) as %s", self.bundle.spec.name, source["format"],
                 source["conversion"], self.bundle.spec.source.path,
                 extra={"model": self.bundle.spec.name, "format": source["format"],
                        "conversion": source["conversion"], "path": source["path"],
                        "keras_file": self.bundle.spec.source.path})
        return self.bundle

    def _conversion_step(self, step: str, message: str) -> None:
        self.status.detail = message
        log.info("converting: %s", message, extra={"step": step})

    @staticmethod
    def _log_resolved(resolved: Resolved) -> None:
        extra = {"how": resolved.how, "directory": str(resolved.directory), **resolved.conversion}
        if resolved.conversion:
            log.info("converted in %.1f s, peak RSS %.0f MiB: %s", resolved.conversion["seconds"],
                     resolved.conversion["peak_rss_mib"], resolved.directory, extra=extra)
        else:
            log.info("%s, no conversion: %s", resolved.how, resolved.directory, extra=extra)

    @property
    def source(self) -> dict[str, object]:
        """What ``MODEL_PATH`` holds: the original file, even when a cached conversion serves it."""
        assert self.bundle is not None and self.resolved is not None
        spec, bundle = self.bundle.spec, self.bundle
        if self.resolved.how == "converted directory" or not bundle.converted_from:
            return {"path": spec.source.path, "format": spec.source.format,
                    "conversion": spec.source.conversion, "keras_version": spec.source.keras_version,
                    "converted_from": bundle.converted_from}
        return {**bundle.converted_from, "converted_from": None}

    async def prepare(self) -> None:
        """Engine, self-checks, warm-up; sets the status to ready or failed."""
        try:
            await self._prepare()
        except Exception as exc:
            self.status.stage, self.status.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model not ready: %s", self.status.error)
            return
        self.status.seconds_to_ready = time.perf_counter() - self.status.started_at
        self.status.stage, self.status.ready = "ready", True
        self.metrics.ready.set(1)
        log.info("ready in %.2f s", self.status.seconds_to_ready,
                 extra={"seconds_to_ready": round(self.status.seconds_to_ready, 3)})

    @property
    def model_input(self) -> ModelInput:
        """What a request carries per step: token ids or feature vectors (see app.api.inputs)."""
        assert self.bundle is not None
        return self.bundle.spec.input

    @property
    def accepting(self) -> bool:
        """Whether /infer is served: once ready, and on through draining."""
        return self.status.stage in ("ready", "draining")

    def drain(self) -> None:
        """Stop reporting ready (shutdown has begun); requests are still answered."""
        self.status.stage, self.status.ready = "draining", False
        self.metrics.ready.set(0)
        log.info("draining: /readyz now answers 503")

    async def _prepare(self) -> None:
        assert self.bundle is not None
        settings, bundle, spec = self.settings, self.bundle, self.bundle.spec
        tolerance = tolerance_for(settings.parity_tolerance, bundle.parity)
        if bundle.keras is not None and bundle.keras.check is not None:
            self.status.stage = "self-check"
            self.keras_check = SelfCheck(**bundle.keras.check.model_dump(), tolerance=tolerance)
            _require(self.keras_check, "the Keras model against the parity data")
        buckets = length_buckets(settings.max_len)
        keras_file = spec.source.path if bundle.keras is not None else None  # the saved Keras model
        self.engine_choice = await asyncio.to_thread(
            choose_engine, settings.engine, spec, settings.threads, buckets, settings.max_batch_size,
            keras_file=keras_file)
        engine = self.engine_choice.engine
        runner = Runner(engine, buckets, settings.max_batch_size, settings.max_batch_tokens)
        self.metrics.queue_depth.set_function(lambda: self.batcher.pending if self.batcher else 0)
        source = self.source
        self.metrics.model_info.labels(spec.name, __version__, source["format"],
                                       source["conversion"], engine.name).set(1)
        self.status.stage = "self-check"
        if bundle.parity is not None:
            self.self_check = await self._check(bundle.parity, runner, tolerance,
                                                "the engine against the parity data")
        if bundle.keras_outputs is not None:
            self.engine_vs_keras = await self._check(
                bundle.keras_outputs, runner, bundle.keras_outputs.tolerance or tolerance,
                "the engine against the Keras model's outputs")
        checked = self.self_check or self.engine_vs_keras
        if checked is not None:
            self.metrics.self_check_diff.set(checked.worst)
        self.status.stage = "warm-up"
        await asyncio.to_thread(runner.warm_up)
        workers = self._size_budget(settings.workers if engine.parallel_calls else 1)
        self.batcher = MicroBatcher(runner, workers, settings.max_batch_size,
                                    settings.max_queue_delay_ms / 1000, settings.max_queue)
        self.batcher.on_batch.append(self.metrics.observe_batch)
        self.batcher.start()

    def _size_budget(self, workers: int) -> int:
        """Price requests for this model; size the budget now that the RSS is the baseline.
        Returns the engine calls that may run at once (fewer than ``workers`` when the
        container's memory can't hold that many)."""
        assert self.bundle is not None
        spec, settings = self.bundle.spec, self.settings
        self.costs = CostModel(
            length_buckets(settings.max_len), spec.output_width, spec.hidden_width,
            sum(layer.state_floats for layer in spec.layers),
            settings.max_batch_tokens, settings.max_batch_size)
        per_call = self.costs.engine_reserve(1)
        self.budget, affordable = sized_budget(settings.memory_budget_bytes, workers, per_call)
        if affordable < workers:
            log.warning("running %d engine calls at once, not %d: the memory limit holds no more",
                        affordable, workers)
        budget = self.budget
        self.metrics.memory_used.set_function(lambda: budget.used)
        self.metrics.memory_waiting.set_function(lambda: budget.waiting)
        log.info("memory budget %.0f MiB (%s)", (budget.total + budget.waiting_room) / 2**20,
                 budget.derivation, extra={"memory_budget": budget.describe()})
        return affordable

    async def _check(self, parity: ParityData, runner: Runner, tolerance: float, what: str) -> SelfCheck:
        """The serving engine against recorded outputs; raises if they differ too much."""
        check = await asyncio.to_thread(run_self_check, parity, runner.run, tolerance)
        log.info("self-check %s: %s", "passed" if check.passed else "FAILED", what,
                 extra={"self_check": check.as_dict()})
        _require(check, what)
        return check

    def infer_parts(self, parts: list[list[np.ndarray]]) -> AsyncIterator[list[Result]]:
        """Results part by part (see :meth:`MicroBatcher.stream`)."""
        assert self.batcher is not None
        return self.batcher.stream(parts)

    async def close(self) -> None:
        stop_conversions()  # a shutdown during start-up doesn't wait for the conversion
        if self.batcher is not None:
            await self.batcher.close()

    def metadata(self) -> dict:
        status = {"stage": self.status.stage, "detail": self.status.detail, "ready": self.status.ready,
                  "error": self.status.error, "seconds_to_ready": self.status.seconds_to_ready}
        common = {"engine": self.settings.engine, "status": status,
                  "limits": self.limits(), "versions": _versions()}
        if self.bundle is None:  # still converting
            return {"name": None, "source": {"path": str(self.settings.model_path)}, **common}
        spec = self.bundle.spec
        return {
            "name": spec.name,
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
