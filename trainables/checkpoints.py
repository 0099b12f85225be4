"""Checkpoint files: one plain dict per file, with a manifest that proves it complete.

A checkpoint is two files side by side: ``NAME.pt`` (``torch.save`` of the state dict)
and ``NAME.json``, its manifest: the format, the epoch, the byte count and SHA-256 of
the ``.pt`` file, and the per-epoch metric history. ``save_checkpoint`` writes each file
to a temporary name in the same folder, flushes and fsyncs it, renames it into place and
fsyncs the folder: the ``.pt`` first, the manifest last, so a manifest only ever
describes a complete file. A reader trusts a ``.pt`` only when its manifest's size and
digest match (``CorruptCheckpointError`` otherwise): a truncated copy, a half-written
upload or a flipped bit is detected, where ``torch.load`` alone loads a corrupt tensor
without complaint.

The same pair lives in Ray Tune's checkpoint folders in a trial's storage (any pyarrow
filesystem: local, NFS, S3); ``stored_checkpoints`` lists them newest first from their
manifests and ``read_stored_checkpoint`` loads one after checking it, so the trainable
restores from the newest *complete* checkpoint and the driver can read a trial's
history (the manifest) without loading its weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import torch

from trainables.problems import clip

FORMAT = "normlab.checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "checkpoint.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or does not match its manifest."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every filesystem lets a folder be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all: temp file, fsync, rename, fsync of the folder.

    The one local atomic write of the project: checkpoints here, and every file normlab
    keeps beside Ray's state (``orchestrator.state.storage.write_atomic`` on a local path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # as an ordinary new file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def manifest_path(path: str | Path) -> Path:
    """``NAME.json`` beside ``NAME.pt``."""
    return Path(path).with_suffix(".json")


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint file holds, readable without loading it."""

    epoch: int
    sha256: str
    bytes: int
    format: str = FORMAT
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, allow_nan=True).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str) -> Manifest:
        try:
            raw = json.loads(data)
            known = {f.name for f in fields(cls)}
            manifest = cls(**{k: v for k, v in raw.items() if k in known})  # a newer normlab's extra fields
        except (ValueError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{name}: unreadable checkpoint manifest ({exc})") from exc
        if manifest.format != FORMAT:
            raise CorruptCheckpointError(
                f"{name}: checkpoint format {manifest.format!r}, this normlab reads {FORMAT!r}"
            )
        if (
            not isinstance(manifest.epoch, int)
            or not isinstance(manifest.sha256, str)
            or not isinstance(manifest.bytes, int)
        ):
            raise CorruptCheckpointError(f"{name}: checkpoint manifest has wrong field types")
        return manifest


def encode_checkpoint(state: dict[str, Any], extra: dict[str, Any] | None = None) -> tuple[bytes, Manifest]:
    """``torch.save`` bytes of ``state`` and their manifest (``extra``: small JSON facts, e.g. the run id)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    epoch = state.get("epoch", 0)
    history = state.get("history", [])
    manifest = Manifest(
        epoch=int(epoch) if isinstance(epoch, int) else 0,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        history=list(history) if isinstance(history, list) else [],
        extra=dict(extra or {}),
    )
    return data, manifest


def save_checkpoint(state: dict[str, Any], path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save ``state`` to ``path`` and its manifest beside it, each atomically and fsynced; returns ``path``."""
    data, manifest = encode_checkpoint(state, extra)
    # the old manifest goes first: a crash between the two writes leaves a file without a
    # manifest (read unchecked), never a manifest that describes another file
    manifest_path(path).unlink(missing_ok=True)
    path = write_atomic(path, data)
    write_atomic(manifest_path(path), manifest.to_json())
    return path


def verify(data: bytes, manifest: Manifest, name: str) -> None:
    """Raise ``CorruptCheckpointError`` unless ``data`` is what ``manifest`` describes."""
    if len(data) != manifest.bytes:
        raise CorruptCheckpointError(
            f"{name}: {len(data)} bytes, its manifest says {manifest.bytes} (truncated or overwritten)"
        )
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise CorruptCheckpointError(f"{name}: SHA-256 does not match its manifest (corrupt)")


def decode_state(data: bytes | BinaryIO, name: str) -> Any:
    """``torch.load`` (weights only, onto the CPU); an unreadable file is a ``CorruptCheckpointError``."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptCheckpointError(f"{name} is not a readable PyTorch checkpoint: {_load_error(exc)}") from exc


def _load_error(exc: Exception) -> str:
    """The gist of a ``torch.load`` error on one short line (weights-only errors are paragraphs)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # the rest is advice about weights_only=False, which we never use
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return clip(" ".join(text.split()), 200)


def read_state(source: str | Path | BinaryIO, name: str | None = None) -> Any:
    """``torch.load`` of a file (checked against its manifest when one lies beside it), or
    of an open binary stream called ``name``; a missing or unreadable one is a clear error."""
    if isinstance(source, str) and "://" in source:
        return _read_uri(source, name or source)
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        name = name or str(path)
        data = path.read_bytes()
        manifest = manifest_path(path)
        if path.suffix == ".pt" and manifest.is_file():
            verify(data, Manifest.from_json(manifest.read_bytes(), str(manifest)), name)
        return decode_state(data, name)
    return decode_state(source, name or "checkpoint stream")


def _read_uri(uri: str, name: str) -> Any:
    """A checkpoint on any pyarrow filesystem (``s3://bucket/.../checkpoint.pt?endpoint_override=...``),
    checked against its manifest when one lies beside it."""
    from urllib.parse import urlsplit, urlunsplit

    from pyarrow import fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"checkpoint not found: {uri}")
        data = _read_bytes(fs, path)
        parts = urlsplit(uri)
        manifest_uri = urlunsplit(parts._replace(path=str(Path(parts.path).with_suffix(".json"))))
        manifest_fs, manifest = pafs.FileSystem.from_uri(manifest_uri)
        if path.endswith(".pt") and manifest_fs.get_file_info(manifest).type == pafs.FileType.File:
            verify(data, Manifest.from_json(_read_bytes(manifest_fs, manifest), manifest_uri), name)
    except (OSError, ValueError) as exc:
        if isinstance(exc, (FileNotFoundError, CorruptCheckpointError)):
            raise
        raise CorruptCheckpointError(f"{name}: cannot be read ({exc})") from exc
    return decode_state(data, name)


def load_checkpoint(source: str | Path | BinaryIO, name: str | None = None) -> dict[str, Any]:
    """A normlab checkpoint dict (see ``read_state``); anything without a model is an error."""
    state = read_state(source, name)
    if not isinstance(state, dict) or "model" not in state:
        raise CorruptCheckpointError(f"{name or source} is not a normlab checkpoint (no 'model' entry)")
    return state


# ------------------------------------------------------------ checkpoints in a trial's storage


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint folder of a trial in its storage filesystem, as its manifest describes it."""

    folder: str
    manifest: Manifest

    @property
    def file(self) -> str:
        return f"{self.folder}/{CHECKPOINT_FILE}"

    @property
    def epoch(self) -> int:
        return self.manifest.epoch


def _read_bytes(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def checkpoint_folders(fs: Any, trial_path: str) -> list[str]:
    """The ``checkpoint_*`` folders under ``trial_path`` (complete or not), oldest name first;
    none when the trial's folder does not exist yet."""
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def stored_checkpoints(fs: Any, trial_path: str) -> tuple[list[StoredCheckpoint], list[str]]:
    """Checkpoint folders under ``trial_path`` with a readable manifest, newest epoch first,
    and a note for each folder whose manifest is missing or unreadable (an incomplete copy)."""
    from pyarrow import fs as pafs

    folders = checkpoint_folders(fs, trial_path)
    found = {info.path: info for info in fs.get_file_info([f"{f}/{MANIFEST_FILE}" for f in folders])}
    found.update({info.path: info for info in fs.get_file_info([f"{f}/{CHECKPOINT_FILE}" for f in folders])})
    stored, notes = [], []
    for folder in folders:
        has_manifest = found[f"{folder}/{MANIFEST_FILE}"].type == pafs.FileType.File
        has_file = found[f"{folder}/{CHECKPOINT_FILE}"].type == pafs.FileType.File
        if not has_manifest:
            if has_file:
                notes.append(f"{folder}: {CHECKPOINT_FILE} without its manifest (an incomplete copy)")
            continue  # pruned folders hold nothing
        try:
            manifest = Manifest.from_json(_read_bytes(fs, f"{folder}/{MANIFEST_FILE}"), f"{folder}/{MANIFEST_FILE}")
        except (CorruptCheckpointError, FileNotFoundError) as exc:  # any other OSError (a storage hiccup) propagates:
            notes.append(str(exc))  # the trial is retried, nothing is skipped
            continue
        stored.append(StoredCheckpoint(folder, manifest))
    stored.sort(key=lambda s: (s.epoch, s.folder), reverse=True)
    return stored, notes


def _read_payload(fs: Any, file: str) -> bytes:
    """A checkpoint's bytes; a missing file is a ``CorruptCheckpointError``, any other OSError (a
    storage hiccup) propagates, so the trial is retried and nothing is skipped."""
    try:
        return _read_bytes(fs, file)
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{file}: missing ({exc})") from exc


def read_stored_checkpoint(fs: Any, stored: StoredCheckpoint) -> dict[str, Any]:
    """Load one stored checkpoint after checking it against its manifest."""
    data = _read_payload(fs, stored.file)
    verify(data, stored.manifest, stored.file)
    state = decode_state(data, stored.file)
    if not isinstance(state, dict) or "model" not in state:
        raise CorruptCheckpointError(f"{stored.file} is not a normlab checkpoint (no 'model' entry)")
    return state


def unmanifested_checkpoints(fs: Any, trial_path: str) -> list[str]:
    """Checkpoint folders under ``trial_path`` holding a payload but no manifest (written by a
    normlab from before manifests, or a copy cut short), newest folder first."""
    from pyarrow import fs as pafs

    folders = checkpoint_folders(fs, trial_path)[::-1]
    manifests = fs.get_file_info([f"{f}/{MANIFEST_FILE}" for f in folders])
    payloads = fs.get_file_info([f"{f}/{CHECKPOINT_FILE}" for f in folders])
    return [
        f
        for f, m, p in zip(folders, manifests, payloads)
        if m.type != pafs.FileType.File and p.type == pafs.FileType.File
    ]


def read_unmanifested_checkpoint(fs: Any, folder: str) -> dict[str, Any]:
    """Load a checkpoint that has no manifest to check it against: it must load and hold a
    model and an integer epoch (a payload cut short does not load: torch's zip format ends
    with its index)."""
    file = f"{folder}/{CHECKPOINT_FILE}"
    state = decode_state(_read_payload(fs, file), file)
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("epoch"), int):
        raise CorruptCheckpointError(f"{file} is not a normlab checkpoint (no 'model' or 'epoch' entry)")
    return state


def delete_stored_checkpoint(fs: Any, stored: StoredCheckpoint) -> None:
    """Remove a checkpoint's manifest, then its payload (the folder stays: Ray's state may name
    it); a crash in between leaves a payload without a manifest, which restore never prefers."""
    for path in (f"{stored.folder}/{MANIFEST_FILE}", stored.file):
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass
