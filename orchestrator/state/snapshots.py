"""Last-known-good copies of Ray Tune's experiment state, so a search can always resume.

Ray Tune keeps a search's state in the top level of its folder (``experiment_state-*.json``,
the search algorithm's ``*-state-*.json``/``.pkl``, ``tuner.pkl``) and rewrites those files
in place from a driver-side staging copy every few seconds. On a filesystem the rewrite
is not atomic: a storage that fills up, or a driver killed mid-copy, leaves a truncated
file, and ``Tuner.restore`` then cannot read the search at all (seen here: a full disk
left ``experiment_state`` cut mid-string).

normlab therefore copies each of those files, whenever it changed and reads back whole
(a pickle that ends with its STOP opcode, or JSON that parses), into ``normlab/state/``
inside the search folder, atomically (``storage.write_atomic``), where Ray never writes.
Before ``normlab resume`` or ``normlab status`` reads a search, ``repair`` puts the last
good copy back over any state file that is missing or damaged. A repaired state may be a
few seconds older than the search: trials then continue from their own newest complete
checkpoints (``trainables.ray_trainable``), which do not depend on Ray's state.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import pickletools

from pyarrow import fs as pafs

from orchestrator.state import storage
from orchestrator.state.storage import Location

STATE_FILES = ("experiment_state-*.json", "*-state-*.json", "searcher-state-*.pkl", "tuner.pkl")
BACKUP_DIR = "normlab/state"
log = logging.getLogger("normlab.storage")


def _state_files(folder: Location) -> list[pafs.FileInfo]:
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    return [
        i for i in infos if i.type == pafs.FileType.File and any(fnmatch.fnmatch(i.base_name, p) for p in STATE_FILES)
    ]


def is_whole(name: str, data: bytes) -> bool:
    """Whether a state file reads back complete: a pickle whose opcodes run to its STOP (walked
    with ``pickletools``, nothing executed), or JSON that parses."""
    if not data:
        return False
    if data[:1] == b"\x80":  # a pickle (Ray names some of its pickles *.json)
        try:
            end = 0
            for opcode, _, pos in pickletools.genops(data):  # noqa: B007  (the last opcode is read after the loop)
                end = pos
            return opcode.name == "STOP" and end == len(data) - 1
        except Exception:  # cut short: "pickle exhausted before seeing STOP", a bad opcode, ...
            return False
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


class StateBackup:
    """Copies a search's state files into ``normlab/state/`` when they changed and are whole."""

    def __init__(self, folder: Location) -> None:
        self.folder = folder
        self.backups = folder.child(BACKUP_DIR)
        self._seen: dict[str, tuple[int | None, int]] = {}  # name -> (mtime, size) last looked at
        self._saved: dict[str, str] = {}  # name -> digest of the copy in the backup folder

    def has_experiment_state(self) -> bool:
        """Whether a good copy of Tune's experiment state has been saved by this backup."""
        return any(fnmatch.fnmatch(name, STATE_FILES[0]) for name in self._saved)

    def backup(self) -> int:
        """One pass; returns how many files were copied. Never raises (a full disk is the
        very case this guards against: the old good copy then simply stays)."""
        copied = 0
        try:
            infos = _state_files(self.folder)
        except OSError as exc:
            log.debug("state backup: cannot list %s: %s", self.folder, exc)
            return 0
        for info in infos:
            stamp = (info.mtime_ns, info.size)
            if self._seen.get(info.base_name) == stamp:
                continue
            try:
                data = storage.read_bytes(self.folder.child(info.base_name))
            except (OSError, FileNotFoundError):
                continue
            self._seen[info.base_name] = stamp
            digest = hashlib.sha256(data).hexdigest()
            if self._saved.get(info.base_name) == digest or not is_whole(info.base_name, data):
                continue
            try:
                storage.write_atomic(self.backups.child(info.base_name), data)
            except storage.StorageError as exc:
                log.debug("state backup of %s failed: %s", info.base_name, exc)
                self._seen.pop(info.base_name, None)  # try again next time
                continue
            self._saved[info.base_name] = digest
            copied += 1
        return copied


def repair(folder: Location) -> list[str]:
    """Put the last good copy back over every state file of ``folder`` that is missing or
    damaged; returns the names repaired. A damaged experiment state with no good copy (a
    session whose backup could not be written either, e.g. on a full disk) is moved aside to
    ``*.damaged``, so that Ray restores the newest whole one of an earlier session."""
    backups = folder.child(BACKUP_DIR)
    try:
        saved = _state_files(backups)
    except OSError:
        return []
    repaired = _set_aside_damaged(folder, {i.base_name for i in saved})
    for info in saved:
        target = folder.child(info.base_name)
        try:
            current = storage.read_bytes(target)
        except FileNotFoundError:
            current = b""
        if is_whole(info.base_name, current):
            continue
        good = storage.read_bytes(backups.child(info.base_name))
        if is_whole(info.base_name, good):
            storage.write_atomic(target, good)
            repaired.append(info.base_name)
    return repaired


def _set_aside_damaged(folder: Location, backed_up: set[str]) -> list[str]:
    try:
        current = [i for i in _state_files(folder) if fnmatch.fnmatch(i.base_name, STATE_FILES[0])]
    except OSError:
        return []
    moved = []
    for info in current:
        if info.base_name in backed_up:
            continue
        try:
            if not is_whole(info.base_name, storage.read_bytes(folder.child(info.base_name))):
                folder.fs.move(info.path, info.path + ".damaged")
                moved.append(info.base_name)
        except OSError as exc:
            log.debug("cannot set %s aside: %s", info.base_name, exc)
    return moved


class IncompatibleStateError(LookupError):
    """A search's Tune state names code this normlab no longer has (started by an earlier version)."""


def check_loadable(folder: Location) -> None:
    """Raise ``IncompatibleStateError`` when ``tuner.pkl`` of ``folder`` cannot be unpickled
    because a class or module it names is gone (an earlier normlab's callback, say); Ray
    would fail on it inside ``Tuner.restore`` with a bare ``AttributeError``. Missing or
    damaged files are left to ``repair`` and Ray."""
    import ray.cloudpickle

    target = folder.child("tuner.pkl")
    try:
        data = storage.read_bytes(target)
    except FileNotFoundError:
        return
    if not is_whole(target.name, data):
        return
    try:
        ray.cloudpickle.loads(data)
    except (AttributeError, ImportError) as exc:
        raise IncompatibleStateError(
            f"{target.uri}: this search was started by an earlier normlab, and its Ray Tune state names code this "
            f"version does not have ({exc}). Its MLflow runs and checkpoints are intact, but it cannot be resumed: "
            "submit the search file again"
        ) from exc
