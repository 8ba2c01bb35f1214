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
