"""Service settings, read from the environment (and an optional ``.env``) by pydantic-settings."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "segmenter"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    model_path: Path = Field(DEFAULT_MODEL, description="model directory (with model.json) or file")
    engine: Literal["onnxruntime", "keras"] = Field(
        "onnxruntime", description="onnxruntime (fastest) or keras (XLA-compiled Keras 3)")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                         description="engine calls that run in parallel (onnxruntime; keras uses 1)")
    threads: int | None = Field(None, ge=1, description="intra-op threads of each engine call "
                                "(default: 1 for onnxruntime, all cores for keras)")

    max_batch: int = Field(64, ge=1, description="most sequences in one request")
    max_len: int = Field(2048, ge=1, description="most tokens in one sequence")
    max_batch_size: int = Field(32, ge=1, description="most sequences the engine runs in one call")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="how long the batcher waits for more work before a call "
        "(0: never; requests that arrive while the engine is busy batch by themselves)")

    max_queue: int = Field(512, ge=1, description="most sequences waiting for the engine; "
                           "past that, /infer answers 503 with Retry-After at once")
    request_timeout_s: float = Field(10.0, gt=0, description="deadline of one /infer request (504 past it)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024,
                                description="largest request body; bigger ones get 413 before parsing")

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
