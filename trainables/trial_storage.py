"""A trial's folder in the search's storage, as the trial and the driver see it.

``TrialStorage(fs, path)`` (any pyarrow filesystem, the trial's folder in it) restores
the newest *complete* checkpoint, prunes old payloads, flushes local files to disk, and
owns the fatal marker: a small JSON file, ``{"error": reason}``, that records a
non-retryable failure so that a restart Ray attempts anyway fails at once with the same
reason (``trainables.ray_trainable``), the driver cancels the trial's remaining retries
(``orchestrator.running.callbacks``), and ``normlab resume`` can forget it to try again
(``orchestrator.running.driver``). Its name and format live here only.

Plain Python and pyarrow: no Ray, no MLflow.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from trainables.checkpoints import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    CorruptCheckpointError,
    checkpoint_folders,
    delete_stored_checkpoint,
    read_stored_checkpoint,
    read_unmanifested_checkpoint,
    stored_checkpoints,
    unmanifested_checkpoints,
)

FATAL_FILE = "normlab_fatal.json"
log = logging.getLogger("normlab.trial")


class TrialStorage:
    """This trial's folder in the search's storage (any pyarrow filesystem)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    # ------------------------------------------------------------- checkpoints

    def has_checkpoint_folder(self) -> bool:
        """Whether an earlier attempt of this trial left a checkpoint folder here (complete or
        not): one listing of the trial's folder; False when it cannot be listed."""
        try:
            return bool(checkpoint_folders(self.fs, self.path))
        except OSError:
            return False

    def restore(self) -> tuple[dict[str, Any] | None, list[str]]:
        """The newest complete checkpoint (None: start fresh), and a note per checkpoint skipped.

        Checkpoints that fail their manifest's check are removed once skipped (so that pruning
        never keeps them in place of good ones); a storage error other than a missing file
        propagates (the trial is retried rather than started over). With no usable checkpoint
        that has a manifest, the newest one without (an earlier normlab's) is tried."""
        stored, notes = stored_checkpoints(self.fs, self.path)
        for candidate in stored:
            try:
                state = read_stored_checkpoint(self.fs, candidate)
            except CorruptCheckpointError as exc:
                try:
                    delete_stored_checkpoint(self.fs, candidate)
                    notes.append(f"{exc} (removed)")
                except OSError as removal:  # kept; restore skips it again next time
                    notes.append(f"{exc} (could not be removed: {removal})")
                continue
            if notes:
                notes.append(f"resumed from epoch {candidate.epoch} ({candidate.folder})")
            return state, notes
        for folder in unmanifested_checkpoints(self.fs, self.path):
            try:
                state = read_unmanifested_checkpoint(self.fs, folder)
            except CorruptCheckpointError as exc:
                notes.append(str(exc))
                continue
            notes.append(
                f"resumed from epoch {state['epoch']} ({folder}, a checkpoint without a manifest: it loaded "
                "and holds a model)"
            )
            return state, notes
        if notes:
            notes.append("no complete checkpoint left: started from scratch")
        return None, notes

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints (by epoch); older ones lose their payload.
        Best effort: the epoch is already persisted, so a storage error here is only a warning."""
        try:
            stored, _ = stored_checkpoints(self.fs, self.path)
            for old in stored[keep:]:
                delete_stored_checkpoint(self.fs, old)
        except OSError as exc:
            log.warning("could not prune old checkpoints in %s (%s); they are kept", self.path, exc)

    def fsync(self) -> None:
        """Flush persisted checkpoint files to disk when the storage is a local filesystem."""
        from pyarrow import fs as pafs

        if not isinstance(self.fs, pafs.LocalFileSystem):
            return
        try:
            newest = stored_checkpoints(self.fs, self.path)[0][:1]
        except OSError as exc:
            log.warning("could not list checkpoints in %s to fsync them (%s)", self.path, exc)
            return
        for stored in newest:
            for name in (CHECKPOINT_FILE, MANIFEST_FILE):
                try:
                    fd = os.open(f"{stored.folder}/{name}", os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    # ------------------------------------------------------------ the fatal marker

    @property
    def fatal_marker(self) -> str:
        """Where the marker of a non-retryable failure lives."""
        return f"{self.path}/{FATAL_FILE}"

    def _read_fatal(self) -> Any:
        with self.fs.open_input_stream(self.fatal_marker) as fh:
            return json.loads(fh.read())

    def fatal(self) -> dict[str, Any] | None:
        """The marker of the non-retryable failure recorded by an earlier attempt, ``{"error":
        reason}``, if any (None, too, when it cannot be read or is not JSON)."""
        try:
            return self._read_fatal()
        except (OSError, ValueError):
            return None

    def fatal_reason(self) -> str | None:
        """The reason in the fatal marker, if any (None, too, when the marker cannot be read,
        is not JSON or has no reason)."""
        try:
            return self._read_fatal()["error"]
        except (OSError, ValueError, KeyError):
            return None

    def record_fatal(self, reason: str) -> None:
        """Write the fatal marker; best effort (a warning when the storage refuses it)."""
        try:
            self.fs.create_dir(self.path)
            with self.fs.open_output_stream(self.fatal_marker) as fh:
                fh.write(json.dumps({"error": reason}).encode())
        except OSError as exc:  # e.g. the storage is full: the run's tag still says why
            log.warning("could not record the failure in %s: %s", self.path, exc)

    def clear_fatal(self) -> bool:
        """Remove the fatal marker; whether there was one. A storage error propagates."""
        from pyarrow import fs as pafs

        if self.fs.get_file_info(self.fatal_marker).type != pafs.FileType.File:
            return False
        self.fs.delete_file(self.fatal_marker)
        return True
