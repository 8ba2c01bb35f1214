"""The model repository on disk (``MODEL_REPOSITORY``), laid out as TF Serving's and Triton's::

    <repository>/<name>/config.json     optional: {"version_policy": "latest:2" | "all" | "specific:1,3"}
    <repository>/<name>/<N>/...         version N (a positive number) of model <name>

A version directory holding a ``model.json`` is itself a model directory (as ``MODEL_PATH``
takes one); else it holds one model file (``model.h5``, ``model.keras``, ...), one model
directory, or one TF checkpoint (``<prefix>.index`` and its data files). Entries whose names
start with a dot, and version directories not named by a number, are not read: a version is
written under another name and renamed into place when complete.

Names are names, never paths: a model is named by ``[A-Za-z0-9][A-Za-z0-9_.-]*``, and what a
name leads to (through symlinks too) must lie inside the repository.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from app.service.policy import VersionPolicy

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION = re.compile(r"^[1-9][0-9]{0,8}$")
CONFIG = "config.json"


def valid_name(name: str) -> bool:
    return bool(NAME.match(name)) and ".." not in name


def valid_version(text: str) -> bool:
    return bool(VERSION.match(text))


@dataclass(frozen=True)
class VersionDir:
    """One version as found: ``model`` is what ``MODEL_PATH`` would take, or None with the
    ``problem``; ``fingerprint`` changes when any of its files does."""

    number: int
    model: Path | None
    problem: str | None
    fingerprint: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ModelDir:
    name: str
    versions: dict[int, VersionDir]
    policy: VersionPolicy | None  # from its config.json; None: the server's
    problem: str | None = None  # a config.json that can't be read


def scan(root: Path) -> dict[str, ModelDir]:
    """Every model of the repository, by name."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the model repository is not a directory")
    found = (scan_model(root, entry.name) for entry in sorted(root.iterdir()) if valid_name(entry.name))
    return {model.name: model for model in found if model is not None}


def scan_model(root: Path, name: str) -> ModelDir | None:
    """Model ``name`` as it is on disk, or None when the repository has no such model."""
    if not valid_name(name):
        return None
    directory = root / name
    if not directory.is_dir() or not _inside(directory, root):
        return None
    policy, problem = _read_config(directory / CONFIG)
    versions = {int(entry.name): _version(root, entry) for entry in directory.iterdir()
                if valid_version(entry.name) and entry.is_dir()}
    return ModelDir(name, versions, policy, problem)


def _version(root: Path, directory: Path) -> VersionDir:
    number, fingerprint = int(directory.name), _fingerprint(directory)
    if not _inside(directory, root):
        return VersionDir(number, None, f"{directory} leads out of the repository", fingerprint)
    model, problem = _model_in(directory)
    if model is not None and not _inside(model, root):
        model, problem = None, f"{model} leads out of the repository"
    return VersionDir(number, model, problem, fingerprint)


def _model_in(directory: Path) -> tuple[Path | None, str | None]:
    if (directory / "model.json").is_file():
        return directory, None
    entries = sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
    if len(entries) == 1:
        return entries[0], None
    indexes = [entry for entry in entries if entry.suffix == ".index"]
    prefix = indexes[0].with_suffix("") if len(indexes) == 1 else None
    if prefix is not None and all(entry.name.startswith(prefix.name + ".") for entry in entries):
        return prefix, None  # a TF checkpoint: <prefix>.index and <prefix>.data-*
    listed = ", ".join(entry.name for entry in entries) or "nothing"
    return None, (f"{directory} holds {listed}: expected one model file or directory, "
                  "or a model.json naming the artifact")


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    files = []
    for path in sorted(directory.rglob("*")):
        try:
            stat = path.stat()
        except OSError:
            continue
        files.append((str(path.relative_to(directory)), stat.st_size, stat.st_mtime_ns))
    return tuple(files)


def _read_config(path: Path) -> tuple[VersionPolicy | None, str | None]:
    if not path.exists():
        return None, None
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict) or set(config) - {"version_policy"} or not isinstance(
                config.get("version_policy", ""), str):
            raise ValueError('expected {"version_policy": "..."}')
        text = config.get("version_policy")
        return (VersionPolicy.parse(text) if text is not None else None), None
    except (OSError, ValueError) as exc:
        return None, f"{path}: {exc}"


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())
