"""A model's vocabulary: token strings indexed by id."""

from __future__ import annotations

import json
from pathlib import Path

from app.errors import ModelError


def read_vocabulary(path: Path) -> list[str]:
    """A JSON list of token strings, indexed by id."""
    try:
        tokens = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable vocabulary: {exc}") from exc
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ModelError(f"{path}: the vocabulary must be a JSON list of strings")
    return tokens
