"""Service settings, read from the environment (and an optional ``.env``) by pydantic-settings."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "segmenter"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bigru-serve``, else ``/tmp/bigru-serve-cache``: writable under a
    read-only root filesystem that has a writable /tmp."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "bigru-serve" if xdg else Path(tempfile.gettempdir()) / "bigru-serve-cache"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    model_path: Path = Field(DEFAULT_MODEL, description="model directory (with model.json) or file")
    model_repository: Path | None = Field(
        None, description="a directory of models, <name>/<version>/<model> (docs/repository.md), "
        "served together; MODEL_PATH is then not read")
    default_model: str | None = Field(
        None, description="the model /infer, /v1/model and the OpenAPI request schema serve "
        "(default: the only one; with several and none named, /infer answers 400)")
    version_policy: str = Field(
        "latest:1", pattern=r"^(latest:[1-9][0-9]*|all|specific:[0-9]+(,[0-9]+)*)$",
        description="the versions of each model served: latest:N, all or specific:1,3 (a model's "
        "config.json may say otherwise)")
    model_control: Literal["none", "poll", "explicit"] = Field(
        "none", description="none: load the repository at start-up; poll: also re-scan it every "
        "REPOSITORY_POLL_S; explicit: load at start-up only LOAD_MODELS, then what the repository "
        "API's load and unload say")
    repository_poll_s: float = Field(10.0, gt=0, description="MODEL_CONTROL=poll: seconds between scans")
    load_models: str = Field("", description="MODEL_CONTROL=explicit: the models loaded at start-up, "
                             "comma-separated (* for all)")
    repository_api: bool = Field(
        False, description="serve the repository extension (index, load, unload; REST and gRPC), "
        "to callers bearing ADMIN_TOKEN")
    admin_token: SecretStr | None = Field(None, description="the bearer token of the repository API")
    admin_token_file: Path | None = Field(None, description="a file holding the bearer token "
                                          "(e.g. a mounted Kubernetes secret); read at start-up")
    model_cache_dir: Path = Field(
        default_factory=default_cache_dir, description="where Keras conversions are kept, by the "
        "source's content hash (restarts and replicas sharing it convert once); read-only is fine "
        "when it already holds the model")
    convert_timeout_s: float = Field(600.0, gt=0, description="longest a start-up conversion may take")
    engine: Literal["auto", "native", "onnxruntime", "openvino", "keras"] = Field(
        "auto", description="auto (time native, onnxruntime and openvino, where available, at "
        "start-up and serve the fastest), native (our own recurrence kernel), onnxruntime, openvino "
        "or keras (XLA-compiled Keras 3)")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                         description="engine calls that run in parallel (keras uses 1)")
    threads: int | None = Field(None, ge=1, description="intra-op threads of each engine call "
                                "(default: 1; native: 2, a layer's directions side by side; "
                                "keras: all cores)")

    max_batch: int = Field(64, ge=1, description="most sequences in one request")
    max_len: int = Field(2048, ge=1, description="most tokens in one sequence")
    max_batch_size: int = Field(32, ge=1, description="most sequences the engine runs in one call")
    max_batch_tokens: int = Field(
        8192, ge=1, description="most padded tokens the engine runs in one call (a longer sequence "
        "runs alone): bounds each call's memory, ~6.5 KiB per token on the default model")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="how long the batcher waits for more work before a call "
        "(0: never; requests that arrive while the engine is busy batch by themselves)")
    in_place_tokens: int = Field(
        256, ge=0, description="an engine call of at most this many padded tokens, when it is the "
        "only work, runs on the event loop instead of an engine thread (the two thread hand-offs "
        "and their jitter cost more than holding the loop that long); 0: never")

    max_queue: int = Field(512, ge=1, description="most sequences waiting for the engine; "
                           "past that, /infer answers 503 with Retry-After at once")
    request_timeout_s: float = Field(10.0, gt=0, description="deadline of one /infer request (504 past it)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024,
                                description="largest request body; bigger ones get 413 before parsing")
    discard_body_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="how much of a body past MAX_BODY_BYTES is read and "
        "discarded so that clients which don't send Expect: 100-continue see the 413 (past it, the "
        "connection is closed after the 413)")
    max_requests: int | None = Field(
        None, ge=1, description="most HTTP requests in flight per process, probes and /metrics aside "
        "(past it: 503 with Retry-After at once); default: as many as the memory budget holds of the "
        "cheapest request. gRPC: most calls in flight (past it grpcio answers RESOURCE_EXHAUSTED); "
        "default: an eighth of the memory (MEMORY_BUDGET_BYTES, else the cgroup limit) over 4 x "
        "MAX_BODY_BYTES, what a call holds before its message is priced, at least 4")
    memory_budget_bytes: int | None = Field(
        None, ge=0, description="memory the /infer requests in flight may hold, engine calls aside "
        "(default: the container's cgroup limit minus the RSS at ready, 10% headroom and the engine "
        "calls' reserve; 1 GiB without a limit)")
    header_timeout_s: float = Field(5.0, gt=0, description="deadline for a request's headers, "
                                    "from the connection's first byte (then 408, or a close if idle)")
    body_timeout_s: float = Field(10.0, gt=0, description="deadline for a request's whole body, "
                                  "from its headers (then 408)")
    send_timeout_s: float = Field(10.0, gt=0, description="longest wait for a client to take the next "
                                  "chunk of a streamed answer (then the connection is closed and the "
                                  "request's memory released)")

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = Field(8001, ge=0, le=65535, description="port of the Open Inference Protocol's "
                           "gRPC service, on HOST beside the HTTP port (0: no gRPC)")
    root_path: str = Field("", description="the path prefix a gateway serves us under, e.g. /api/gru")
    forwarded_allow_ips: str = Field("127.0.0.1", description="proxies whose X-Forwarded-* are trusted")
    grace_period_s: float = Field(20.0, ge=0, description="on SIGTERM, the longest wait for in-flight "
                                  "work before exiting (keep it under Kubernetes' 30 s)")
    drain_delay_s: float = Field(2.0, ge=0, description="on SIGTERM, how long /readyz says 503 while "
                                 "still serving, so load balancers stop sending first")
    log_format: Literal["json", "text"] = "json"

    @property
    def shutdown_grace_s(self) -> float:
        """What is left of GRACE_PERIOD_S for work in flight once the drain delay is over."""
        return max(self.grace_period_s - self.drain_delay_s, 1.0)

    parity_tolerance: float | None = Field(
        None, gt=0, description="max abs difference allowed by the start-up self-check "
        "(default: the model's manifest, else 1e-4; use ~1e-2 for TF32 references)")
    exit_on_failure: bool = Field(
        False, description="exit non-zero when the self-check or warm-up fails, instead of "
        "staying up and not ready")
    log_level: str = "info"


@lru_cache
def get_settings() -> Settings:
    return Settings()
