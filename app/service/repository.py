"""The models a server serves, and their versions' lives (compare TF Serving's model manager
and Triton's model repository):

- ``MODEL_PATH`` alone is a repository of one model, version 1, named as the model names
  itself; ``MODEL_REPOSITORY`` is a directory of models and versions (:mod:`.layout`), of
  which each model's version policy (:mod:`.policy`) chooses the versions served.
- Start-up loads every chosen version (``MODEL_CONTROL=explicit``: those of ``LOAD_MODELS``),
  then sizes the one memory budget of all requests from what they left (:mod:`.pricing`).
- A version loaded later (``poll`` finds it, or the repository API's ``load``) is converted,
  checked and warmed while the others serve; it takes its measured memory out of the budget
  (or is refused, with the reason); only then is it routed to. The versions it replaces stop
  taking requests, finish the ones that hold them (:class:`~.model_service.Lease`), and give
  their memory back. A version that fails leaves the last good one serving.
- A request goes to the highest ready version of its model, or to the version it names.

Conversions and loads run one at a time (each is a burst of CPU and memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app.config import Settings
from app.convert.cache import needs_conversion
from app.convert.child import stop_conversions
from app.errors import ModelError
from app.formats.bundle import load_bundle, served_name
from app.observability import Metrics
from app.service.layout import ModelDir, VersionDir, scan, scan_model, valid_name
from app.service.model_service import LOADING, READY, UNAVAILABLE, UNLOADING, ModelService
from app.service.policy import VersionPolicy
from app.service.pricing import (
    CONVERSION_BYTES,
    BudgetTaken,
    MemoryBudget,
    NeverFits,
    headroom_of,
    sized_budget,
)
from app.system import MiB, cgroup_memory_limit, process_rss, trim_heap

log = logging.getLogger("app.service")


class UnknownModel(Exception):
    """No such model (or version) is served: 404."""


class NotReady(Exception):
    """The model is known but has no version ready yet (or any more): 503."""


class ControlError(Exception):
    """A load or unload that can't be done (the reason says why): 400."""


@dataclass
class Model:
    """One model's versions: the instance of each number (serving, loading, failed or
    unloaded) and, while a changed version reloads, its replacement."""

    name: str
    policy: VersionPolicy
    current: dict[int, ModelService] = field(default_factory=dict)
    replacing: dict[int, ModelService] = field(default_factory=dict)
    fingerprints: dict[int, tuple] = field(default_factory=dict)
    on_disk: set[int] = field(default_factory=set)
    unloaded: bool = False

    def serving(self, version: int | None = None) -> ModelService | None:
        """The version named, else the highest ready one."""
        ready = {number: instance for number, instance in self.current.items() if instance.state == READY}
        if version is not None:
            return ready.get(version)
        return ready[max(ready)] if ready else None

    def has(self, number: int) -> bool:
        """Whether version ``number`` is on disk or loaded (and not unloaded since)."""
        instance = self.current.get(number)
        if instance is not None:
            return instance.reason != "unloaded"
        return number in self.on_disk

    def index(self) -> list[dict]:
        """Each version's state (and why, when it is not ready), oldest first."""
        entries = []
        for number in sorted(set(self.current) | self.on_disk):
            instance = self.replacing.get(number) or self.current.get(number)
            if instance is None:
                state, reason = UNAVAILABLE, f"not chosen by the version policy ({self.policy})"
            else:
                state, reason = instance.state, instance.reason
            entry = {"version": str(number), "state": state}
            entries.append(entry | ({"reason": reason} if reason else {}))
        return entries


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.policy = VersionPolicy.parse(settings.version_policy)
        self.root = settings.model_repository
        self.models: dict[str, Model] = {}
        self.budget: MemoryBudget | None = None  # sized once start-up's models are loaded
        self.started = self.draining = False
        self.startup_names: set[str] = set()
        self.loading: ModelService | None = None  # the version being brought up now
        self._one_at_a_time = asyncio.Lock()
        self._changes = asyncio.Lock()
        self._unloads: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    # -- what is served ------------------------------------------------------------------

    def serving(self, name: str, version: str | None = None) -> ModelService:
        """The version a request for ``name`` (and ``version``) goes to; raises
        :class:`UnknownModel` or :class:`NotReady` with a message naming what is missing."""
        model = self.models.get(name) if valid_name(name) else None
        if model is None or model.unloaded:
            known = ", ".join(f"'{known}'" for known in self.names()) or "none"
            raise UnknownModel(f"unknown model '{name}'; served: {known}")
        number = _version_number(name, version)
        instance = model.serving(number)
        if instance is not None and self.started:
            return instance
        if number is not None and not model.has(number):
            versions = ", ".join(f"'{n}'" for n in self.ready_versions(name)) or "none"
            raise UnknownModel(f"model '{name}' has no version '{version}' served (ready: {versions})")
        raise NotReady(self._not_ready(model, number))

    def described(self, name: str, version: str | None = None) -> ModelService:
        """The version to describe: the one serving, else the newest loading or failed."""
        try:
            return self.serving(name, version)
        except NotReady:
            model = self.models[name]
            number = _version_number(name, version)
            instances = {**model.current, **model.replacing}
            if not instances:
                raise
            return instances[number] if number is not None else instances[max(instances)]

    def default(self) -> ModelService:
        """The model ``/infer`` serves: DEFAULT_MODEL, else the only one."""
        name = self.default_name()
        if name is None:
            names = ", ".join(f"/v1/models/{known}/infer" for known in self.names())
            raise ControlError(f"this server serves several models and DEFAULT_MODEL names none: "
                               f"send the request to {names}")
        return self.serving(name)

    def default_name(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        names = self.names()
        return names[0] if len(names) == 1 else None

    def ready_versions(self, name: str) -> list[str]:
        model = self.models.get(name)
        return [] if model is None else [str(number) for number, instance in sorted(model.current.items())
                                         if instance.state == READY]

    def names(self) -> list[str]:
        return sorted(name for name, model in self.models.items() if not model.unloaded)

    def ready_instances(self) -> Iterable[ModelService]:
        return (instance for model in self.models.values() for instance in model.current.values()
                if instance.state == READY)

    def index(self, ready_only: bool = False) -> list[dict]:
        """Every model and version known, with its state (Triton's repository index)."""
        entries = [{"name": name, **entry} for name, model in sorted(self.models.items())
                   for entry in model.index()]
        return [entry for entry in entries if entry["state"] == READY] if ready_only else entries

    @property
    def ready(self) -> bool:
        """Start-up is done and every model it loaded has a version serving."""
        return self.started and not self.draining and all(
            name in self.models and self.models[name].serving() is not None for name in self.startup_names)

    def probe(self) -> dict:
        """``/readyz``'s body: the stage, what is being done, and what failed."""
        failed = [instance for name in sorted(self.startup_names) for instance in self._failures(name)]
        error = "; ".join(instance.status.error or "" if len(self.startup_names) == 1 else
                          f"{instance.name} version {instance.version}: {instance.status.error}"
                          for instance in failed) or None
        loading = self.loading
        if self.draining:
            stage = "draining"
        elif self.ready:
            stage = "ready"
        elif self.started and (failed or loading is None):  # nothing more is coming
            stage = "failed"
            error = error or "; ".join(self._not_ready(self.models[name], None) for name in
                                       sorted(self.startup_names & set(self.models))
                                       if self.models[name].serving() is None)
        else:
            stage = loading.status.stage if loading is not None else "starting"
        detail = loading.status.detail if loading is not None else None
        return {"ready": self.ready, "stage": stage, "detail": detail, "error": error}

    # -- start-up, polling, explicit control -------------------------------------------------

    async def start(self) -> list[ModelService]:
        """Load what start-up serves, size the budget, then serve; returns the versions that failed."""
        found = await asyncio.to_thread(self._found)
        self.startup_names = self._startup_names(found)
        brought_up, failed = [], []
        for name in sorted(self.startup_names):
            for instance, ok in await self._bring_up_model(found[name], starting=True):
                (brought_up if ok else failed).append(instance)
        if self.root is None and any(instance.unreadable for instance in failed):
            return failed  # MODEL_PATH that can't be read stops start-up (app.main exits)
        self._start_serving(brought_up)
        self.started = True
        self.metrics.ready.set(1 if self.ready else 0)
        if self.settings.model_control == "poll" and self.root is not None:
            self._poller = asyncio.create_task(self._poll())
        return failed

    async def load(self, name: str) -> None:
        """Load (or reload) ``name`` from the repository; raises :class:`ControlError`."""
        self._check_control(f"load model '{name}'")
        found = await asyncio.to_thread(scan_model, self.root, name) if self.root else None
        if found is None:
            raise UnknownModel(f"no model '{name}' in the repository")
        async with self._changes:
            known = self.models.get(name)
            if known is not None:  # an explicit load retries the versions that failed
                for number, instance in known.current.items():
                    if instance.status.stage == "failed":
                        known.fingerprints.pop(number, None)
            results = await self._bring_up_model(found)
        model = self.models[name]
        if model.serving() is None:
            reasons = "; ".join(f"version {instance.version}: {instance.reason}" for instance, ok in results
                                if not ok) or "no version is available"
            raise ControlError(f"failed to load '{name}': {reasons}")

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: later requests get 404; admitted ones finish first."""
        self._check_control(f"unload model '{name}'")
        model = self.models.get(name) if valid_name(name) else None
        if model is None or model.unloaded:
            raise UnknownModel(f"unknown model '{name}'")
        async with self._changes:
            await asyncio.gather(*self._unload_model(model))

    async def sync(self) -> None:
        """One scan of the repository: new models and versions loaded, removed ones unloaded."""
        async with self._changes:
            found = await asyncio.to_thread(self._found)
            for model_dir in found.values():
                await self._bring_up_model(model_dir)
            for name, model in self.models.items():
                if name not in found and not model.unloaded:
                    self._unload_model(model)

    def drain(self) -> None:
        """Stop reporting ready (shutdown has begun); requests are still answered."""
        self.draining = True
        self.metrics.ready.set(0)
        for instance in self.ready_instances():
            instance.drain()
        log.info("draining: /readyz now answers 503")

    async def close(self) -> None:
        stop_conversions()  # a shutdown during start-up doesn't wait for a conversion
        if self._poller is not None:
            self._poller.cancel()
        batchers = [instance.batcher for model in self.models.values()
                    for instance in [*model.current.values(), *model.replacing.values()] if instance.batcher]
        await asyncio.gather(*(batcher.close() for batcher in batchers))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.sync()
            except Exception:
                log.exception("scanning the model repository failed; the next scan retries")

    def _check_control(self, what: str) -> None:
        if self.settings.model_control != "explicit":
            raise ControlError(f"cannot {what}: MODEL_CONTROL is {self.settings.model_control}; "
                               "only MODEL_CONTROL=explicit takes load and unload requests")

    # -- bringing versions up and down -------------------------------------------------------

    def _found(self) -> dict[str, ModelDir]:
        """The models on disk; ``MODEL_PATH``: one model, version 1."""
        if self.root is not None:
            return scan(self.root)
        path = self.settings.model_path
        return {(name := served_name(path)): ModelDir(name, {1: VersionDir(1, path, None, ())}, None)}

    def _startup_names(self, found: dict[str, ModelDir]) -> set[str]:
        if self.settings.model_control != "explicit":
            return set(found)
        wanted = {name.strip() for name in self.settings.load_models.split(",") if name.strip()}
        if "*" in wanted:
            return set(found)
        missing = wanted - set(found)
        if missing:
            raise ModelError(f"LOAD_MODELS names {', '.join(sorted(missing))}: not in {self.root}")
        return wanted

    async def _bring_up_model(self, found: ModelDir,
                              starting: bool = False) -> list[tuple[ModelService, bool]]:
        """Load the chosen versions that are new or changed; then unload the versions no longer
        chosen, once one chosen version is ready. Returns each version tried and whether it serves."""
        policy = found.policy or self.policy
        model = self.models.get(found.name)
        if model is None or model.unloaded:
            model = self.models[found.name] = Model(found.name, policy)
        model.policy, model.on_disk = policy, set(found.versions)
        chosen = policy.chosen(found.versions)
        results = []
        for number in sorted(chosen, reverse=True):  # the newest serves first
            version = found.versions[number]
            if model.fingerprints.get(number) == version.fingerprint and number in model.current:
                continue  # unchanged: serving, or failed as it is
            model.fingerprints[number] = version.fingerprint
            problem = found.problem or version.problem
            results.append(await self._bring_up_version(model, number, version.model, problem, starting))
        if any(model.serving(number) for number in chosen):
            for number, instance in list(model.current.items()):
                if number not in chosen and instance.state == READY:
                    self._retire(model, number, instance)
        return results

    async def _bring_up_version(self, model: Model, number: int, source: Path | None, problem: str | None,
                                starting: bool) -> tuple[ModelService, bool]:
        instance = ModelService(model.name, number, source or Path(), self.settings, self.metrics)
        previous = model.current.get(number)
        replacing = previous is not None and previous.state == READY
        (model.replacing if replacing else model.current)[number] = instance
        if problem is not None:
            instance.fail(problem)
            ok = False
        else:
            ok = await self._load_and_start(instance, starting)
        model.replacing.pop(number, None)
        if ok:
            model.current[number] = instance
            if replacing and previous is not None:
                self._retire(model, number, previous, replaced=True)
        return instance, ok

    async def _load_and_start(self, instance: ModelService, starting: bool) -> bool:
        """Convert, load, check and warm ``instance``, measuring the memory it takes; serve it
        now, or (start-up) once the budget is sized."""
        async with self._one_at_a_time:
            self.loading, before = instance, process_rss()
            try:
                async with self._conversion_room(instance):
                    await asyncio.to_thread(instance.load)
            except ModelError as exc:
                instance.fail(str(exc), unreadable=True)
            ok = instance.status.stage != "failed" and await instance.prepare()
            self.loading = None
            resident = max(process_rss() - before, 0)
        if not ok:
            await instance.unload()
            return False
        instance.held_bytes = resident
        if starting:
            return True
        return await self._start_later(instance, resident)

    @contextlib.asynccontextmanager
    async def _conversion_room(self, instance: ModelService) -> AsyncIterator[None]:
        """Once serving, a conversion's child process takes its memory out of a derived budget
        while it runs (refused when it can never fit); the source is read first (no
        TensorFlow), so that a broken file is named as such."""
        budget, settings = self.budget, self.settings
        source = instance.source_path
        if budget is None or budget.limit is None or not await asyncio.to_thread(
                needs_conversion, source, settings.model_cache_dir):
            yield
            return
        await asyncio.to_thread(load_bundle, source)
        try:
            await budget.reserve(CONVERSION_BYTES, settings.request_timeout_s)
        except (NeverFits, BudgetTaken):
            raise ModelError(
                f"{source}: converting it here needs about {CONVERSION_BYTES / MiB:.0f} MiB and the memory "
                f"limit leaves {budget.total / MiB:.0f} MiB: convert it ahead (python -m app convert with "
                "MODEL_REPOSITORY set, as the init container does) or raise the limit") from None
        try:
            yield
        finally:
            budget.unreserve(CONVERSION_BYTES)

    def _start_serving(self, instances: list[ModelService]) -> None:
        """Start-up: the budget from what the loaded models left, then every model serves."""
        engines = [(instance.wanted_calls, _per_call(instance)) for instance in instances]
        self.budget, workers = sized_budget(self.settings.memory_budget_bytes, engines)
        for instance, calls in zip(instances, workers):
            if calls < instance.wanted_calls:
                log.warning("%s runs %d engine calls at once, not %d: the memory limit holds no more",
                            instance.name, calls, instance.wanted_calls)
            instance.held_bytes += calls * _per_call(instance)
            instance.reserved_bytes = calls * _per_call(instance)
            instance.start(self.budget, calls)
        budget = self.budget
        self.metrics.memory_used.set_function(lambda: budget.used)
        self.metrics.memory_waiting.set_function(lambda: budget.waiting)
        log.info("memory budget %.0f MiB (%s)", (budget.total + budget.waiting_room) / MiB,
                 budget.derivation, extra={"memory_budget": budget.describe()})

    async def _start_later(self, instance: ModelService, resident: int) -> bool:
        """Serve a version loaded after start-up, once its memory is counted; else refuse it."""
        budget = self.budget
        assert budget is not None
        calls, per_call = instance.wanted_calls, _per_call(instance)
        if budget.limit is not None:  # derived from the container: the version's memory comes out of it
            calls = max(1, min(calls, budget.total // 2 // per_call))
            needed = resident + calls * per_call
            try:
                await budget.reserve(needed, self.settings.request_timeout_s)
            except (NeverFits, BudgetTaken):
                return await self._refuse(instance, needed, budget.total)
        else:
            needed = resident + calls * per_call
            room = _room_beside(budget)
            if room is not None and calls * per_call > room:
                return await self._refuse(instance, needed, room + resident)
        instance.held_bytes = needed
        instance.reserved_bytes = needed if budget.limit is not None else 0
        instance.start(budget, calls)
        return True

    async def _refuse(self, instance: ModelService, needed: int, room: int) -> bool:
        instance.fail(f"does not fit in memory: it needs about {needed / MiB:.0f} MiB (resident size "
                      f"and engine calls); the memory limit leaves {max(room, 0) / MiB:.0f} MiB")
        await instance.unload()
        await asyncio.to_thread(trim_heap)
        return False

    def _retire(self, model: Model, number: int, instance: ModelService,
                replaced: bool = False) -> asyncio.Task:
        """Unload ``instance`` in the background; it leaves the index unless a new instance of
        its number replaced it (then that one is listed)."""
        if not replaced:
            model.current[number] = instance  # listed as UNLOADING, then UNAVAILABLE: unloaded
        task = asyncio.create_task(self._unload(instance))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)
        return task

    def _unload_model(self, model: Model) -> list[asyncio.Task]:
        model.unloaded = True
        model.fingerprints.clear()
        return [self._retire(model, number, instance) for number, instance in list(model.current.items())
                if instance.state in (READY, LOADING)]

    async def _unload(self, instance: ModelService) -> None:
        await instance.unload()
        if self.budget is not None and self.budget.limit is not None:
            self.budget.unreserve(instance.reserved_bytes)
        await asyncio.to_thread(trim_heap)

    def _failures(self, name: str) -> list[ModelService]:
        model = self.models.get(name)
        if model is None or model.serving() is not None:
            return []
        return [instance for instance in model.current.values() if instance.state == UNAVAILABLE]

    def _not_ready(self, model: Model, number: int | None) -> str:
        named = f"model '{model.name}'" + (f" version {number}" if number is not None else "")
        states = model.index()
        if not self.started or any(entry["state"] in (LOADING, UNLOADING) for entry in states):
            return f"{named} not ready (loading)"
        reasons = "; ".join(f"version {entry['version']}: {entry['reason']}" for entry in states
                            if entry.get("reason"))
        return f"{named} not ready (failed" + (f": {reasons})" if reasons else ")")


def _version_number(name: str, version: str | None) -> int | None:
    if version in (None, ""):
        return None
    if not version.isdigit() or len(version) > 9:
        raise UnknownModel(f"model '{name}' has no version '{version}' (versions are numbers)")
    return int(version)


def _per_call(instance: ModelService) -> int:
    assert instance.costs is not None
    return instance.costs.engine_reserve(1)


def _room_beside(budget: MemoryBudget) -> int | None:
    """With a configured budget in a container: what the limit leaves beside the process (its
    models loaded), the requests' budget and the headroom; None: no limit to keep."""
    limit = cgroup_memory_limit()
    if limit is None:
        return None
    return limit - headroom_of(limit) - process_rss() - (budget.total + budget.waiting_room)
