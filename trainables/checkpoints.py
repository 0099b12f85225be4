"""Checkpoint files: one plain dict per file, written atomically.

``save_checkpoint`` writes to a temporary file in the same folder and renames it, so a
trial killed mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from trainables.problems import clip


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``state`` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_state(source: str | Path | BinaryIO, name: str | None = None) -> Any:
    """``torch.load`` (weights only, onto the CPU) of a file, or an open binary stream called
    ``name``; a missing or unreadable one is a clear error."""
    if isinstance(source, (str, Path)):
        source = Path(source).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"checkpoint not found: {source}")
    name = name or str(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{name} is not a readable PyTorch checkpoint: {_load_error(exc)}") from exc


def _load_error(exc: Exception) -> str:
    """The gist of a ``torch.load`` error on one short line (weights-only errors are paragraphs)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # the rest is advice about weights_only=False, which we never use
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return clip(" ".join(text.split()), 200)


def load_checkpoint(source: str | Path | BinaryIO, name: str | None = None) -> dict[str, Any]:
    """A normlab checkpoint dict (see ``read_state``); anything without a model is an error."""
    state = read_state(source, name)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{name or source} is not a normlab checkpoint (no 'model' entry)")
    return state
