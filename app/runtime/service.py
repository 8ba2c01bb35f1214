"""The model service: load -> convert -> build engine -> self-check -> warm up -> ready.

Reading and converting the file happens before the server accepts connections, so a bad
file stops start-up with its message. Building the engine, the self-check and warm-up run
in the background while ``/healthz`` answers and ``/readyz`` says 503 with the stage.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from app import __version__
from app.config import Settings
from app.formats import ModelBundle, ParityData, load_bundle
from app.observability import Metrics
from app.runtime.batcher import MicroBatcher
from app.runtime.buckets import length_buckets
from app.runtime.engines import make_engine
from app.runtime.runner import Result, Runner
from app.runtime.selfcheck import DEFAULT_TOLERANCE, SelfCheck, run_self_check
from app.spec import ModelInput, TokenInput

log = logging.getLogger("app.service")


@dataclass
class Status:
    stage: str = "starting"  # starting -> loading -> self-check -> warm-up -> ready | failed | draining
    ready: bool = False
    error: str | None = None
    started_at: float = field(default_factory=time.perf_counter)
    seconds_to_ready: float | None = None


class ModelService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status = Status()
        self.bundle: ModelBundle | None = None
        self.batcher: MicroBatcher | None = None
        self.self_check: SelfCheck | None = None

    def load(self) -> ModelBundle:
        """Read and convert the model file; raises :class:`~app.errors.ModelError`."""
        self.status.stage = "loading"
        self.bundle = load_bundle(self.settings.model_path)
        spec = self.bundle.spec
        log.info("model loaded: %s (%s, %s)", spec.name, spec.source.format, spec.source.conversion,
                 extra={"model": spec.name, "format": spec.source.format,
                        "conversion": spec.source.conversion, "path": spec.source.path})
        return self.bundle

    async def prepare(self) -> None:
        """Engine, self-check, warm-up; sets the status to ready or failed."""
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
    def token_range(self) -> tuple[int, int]:
        """Ids a request may carry, for a model taking tokens (``TokenInput.id_range``)."""
        model_input = self.model_input
        assert isinstance(model_input, TokenInput), "this model takes feature vectors"
        return model_input.id_range

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
        settings, spec = self.settings, self.bundle.spec
        buckets = length_buckets(settings.max_len)
        engine = await asyncio.to_thread(make_engine, settings.engine, spec, settings.threads, buckets)
        runner = Runner(engine, buckets, settings.max_batch_size)
        workers = settings.workers if engine.parallel_calls else 1
        self.batcher = MicroBatcher(runner, workers, settings.max_batch_size,
                                    settings.max_queue_delay_ms / 1000, settings.max_queue)
        self.batcher.on_batch.append(self.metrics.observe_batch)
        self.metrics.queue_depth.set_function(lambda: self.batcher.pending if self.batcher else 0)
        self.metrics.model_info.labels(spec.name, __version__, spec.source.format,
                                       spec.source.conversion, engine.name).set(1)
        if self.bundle.parity is not None:
            self.status.stage = "self-check"
            await self._check(self.bundle.parity, runner)
        self.status.stage = "warm-up"
        await asyncio.to_thread(runner.warm_up)
        self.batcher.start()

    async def _check(self, parity: ParityData, runner: Runner) -> None:
        """The serving engine against the GPU's outputs; raises if they differ too much."""
        tolerance = self.settings.parity_tolerance or parity.tolerance or DEFAULT_TOLERANCE
        check = await asyncio.to_thread(run_self_check, parity, runner.run, tolerance)
        self.self_check = check
        self.metrics.self_check_diff.set(check.worst)
        log.info("self-check %s", "passed" if check.passed else "FAILED",
                 extra={"self_check": check.as_dict()})
        if not check.passed:
            raise RuntimeError(f"self-check failed: max abs diff {check.worst:.3g} > tolerance "
                               f"{tolerance:g} against {parity.file}")

    async def infer(self, sequences: list[np.ndarray]) -> list[Result]:
        assert self.batcher is not None
        return await self.batcher.submit(sequences)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()

    def metadata(self) -> dict:
        assert self.bundle is not None
        spec = self.bundle.spec
        return {
            "name": spec.name,
            "source": {"path": spec.source.path, "format": spec.source.format,
                       "conversion": spec.source.conversion,
                       "keras_version": spec.source.keras_version,
                       "converted_from": self.bundle.converted_from},
            "architecture": spec.describe(),
            "input": spec.input.describe(),
            "vocab_size": spec.vocab_size,
            "output_width": spec.output_width,
            "engine": self.settings.engine,
            "self_check": None if self.self_check is None else self.self_check.as_dict(),
            "status": {"stage": self.status.stage, "ready": self.status.ready,
                       "error": self.status.error, "seconds_to_ready": self.status.seconds_to_ready},
            "limits": {"max_batch": self.settings.max_batch, "max_len": self.settings.max_len},
            "versions": _versions(),
        }


def _versions() -> dict[str, str]:
    import onnxruntime

    versions = {"service": __version__, "python": platform.python_version(),
                "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        from importlib.metadata import version

        versions["keras"] = version("keras")
        versions["tensorflow"] = version("tensorflow-cpu")
    except Exception:
        pass
    return versions
