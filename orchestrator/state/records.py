"""The search record: what ``normlab resume`` and ``normlab report`` need besides Ray's state.

``normlab submit`` writes it into the search's folder before the first trial
(``normlab/search.json``, whole or not at all, through the storage's filesystem): the
validated space, the file it came from, the tracker of the parent run (which holds where
MLflow runs go: ``SearchRecord.target``, its URI without any credentials) and, for Optuna
searches, where the study is. This module also finds searches in a storage path, by folder,
URI or name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from orchestrator.searchfile.space import SearchSpace
from orchestrator.state import storage
from orchestrator.state.storage import Location
from orchestrator.tracking.target import TrackingTarget
from orchestrator.tracking.trial_runs import MlflowTrialTracker

RECORD_FILE = "normlab/search.json"  # in a subfolder: Ray rewrites the top-level files of a search in place
LEGACY_RECORD_FILE = "normlab_search.json"


@dataclass
class SearchRecord:
    """What ``normlab resume`` needs besides Ray's own state: the space and where it logs.

    Where it logs is ``target``, which the tracker holds: a new record has it once. Records
    of earlier versions also have the URI at the top level, beside the artifact folder
    (``tracking_uri``, ``artifact_root``; their trackers have no artifact folder): they load
    to the same target, and are written back as they were.
    """

    space: dict[str, Any]
    space_file: str
    tracker: MlflowTrialTracker
    tracking_uri: str | None = None  # records of earlier versions only: the tracker's URI, again
    artifact_root: str | None = None  # only in records of earlier versions (with tracking_uri)
    study_storage: str | None = None  # Optuna searches: the study's SQLAlchemy URL
    study_name: str | None = None

    @property
    def search_name(self) -> str:
        return self.tracker.search_name

    @property
    def target(self) -> TrackingTarget:
        """Where the search's runs go (its URI without credentials: those come from the environment)."""
        if self.tracking_uri is None:
            return self.tracker.target
        return TrackingTarget(self.tracking_uri, self.artifact_root)  # a record of an earlier version

    def to_json(self) -> str:
        # fields left at their defaults are not written: a plain search's record stays the one older
        # normlab versions wrote and read (but for the tracking target, which a new record holds once)
        fields = TypeAdapter(SearchRecord).dump_python(self, mode="json", exclude_defaults=True)
        if self.tracking_uri is not None:  # a record of an earlier version: both, where it had them
            fields.pop("artifact_root", None)
            first = {k: fields.pop(k) for k in ("space", "space_file", "tracking_uri")}
            fields = {**first, "artifact_root": self.artifact_root, **fields}
        return pydantic_core.to_json(fields, indent=2).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> SearchRecord:
        """Parse and check a record; ``pydantic.ValidationError`` (a ValueError) says what is wrong."""
        return TypeAdapter(cls).validate_json(text)


class RecordError(LookupError):
    """A search record that is missing, cut short or malformed: where, what, what to do."""


def write_record(folder: Location, record: SearchRecord) -> None:
    """Write the record into the search's folder, whole or not at all."""
    storage.write_atomic(folder.child(RECORD_FILE), record.to_json().encode())


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()[:5])


def load_record(folder: Location) -> tuple[SearchRecord, SearchSpace]:
    """The record of the search in ``folder`` and its validated space, or one ``RecordError``."""
    where = folder.child(RECORD_FILE)
    if not storage.exists(where) and storage.exists(folder.child(LEGACY_RECORD_FILE)):
        where = folder.child(LEGACY_RECORD_FILE)  # a search submitted by an earlier normlab
    try:
        record = SearchRecord.from_json(storage.read_bytes(where))
    except FileNotFoundError:
        raise RecordError(
            f"{where} is missing: {folder} was not made by `normlab submit` (which writes that record before the "
            "first trial), so normlab does not know its space and MLflow runs; submit the search again"
        ) from None
    except ValidationError as exc:
        cut = any(e["type"] == "json_invalid" for e in exc.errors())
        what = "is not valid JSON; it may have been cut short by a crash" if cut else "is not a normlab search record"
        raise RecordError(
            f"{where} {what} ({_problems(exc)}). It holds the search's space and MLflow run ids: restore it from a "
            "backup, or submit the search again"
        ) from None
    try:
        return record, SearchSpace.model_validate(record.space)
    except ValidationError as exc:
        raise RecordError(
            f"{where} holds a search space this normlab cannot run ({_problems(exc)}); "
            "resume it with the normlab version that submitted it, or submit the search again"
        ) from None


def find_experiment(path_or_name: str, storage_path: str | None = None) -> Location:
    """A search folder given as a path or URI, or the newest search of that name in the storage path."""
    if storage.is_uri(path_or_name) or Path(path_or_name).expanduser().is_dir():
        folder = storage.resolve(path_or_name)
        if storage.exists(folder.child(RECORD_FILE)) or storage.latest_snapshot(folder) is not None:
            return folder
        if storage.is_uri(path_or_name):
            raise LookupError(f"no search at {folder} (neither {RECORD_FILE} nor Ray Tune's experiment state)")
    found = experiment_dirs(storage_path, path_or_name)
    if not found:
        root = storage.resolve(storage_path)
        raise LookupError(f"no search folder {path_or_name!r} (a path, or a search name under {root})")
    return found[-1]


def experiment_dirs(storage_path: str | None, name: str | None = None) -> list[Location]:
    """Search folders in the storage path (newest last), optionally only those of search ``name``."""
    found = storage.search_folders(storage.resolve(storage_path), markers=(RECORD_FILE,))
    if name:
        found = [f for f in found if f.name == name or f.name.rsplit("-", 2)[0] == name]
    return found
