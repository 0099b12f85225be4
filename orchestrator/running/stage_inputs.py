"""What a later stage starts from: the finished trials of the stage before it, read from storage.

A stage with ``init_from: STAGE`` gives each of its trials that starts from a checkpoint the
final checkpoint of its match in the earlier stage (``searchfile.stages`` defines matching
and checks the chain before anything runs); here the earlier stage's folder is read for its
finished trials and the later stage's grid combinations are seeded with them.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from pyarrow import fs as pafs

from orchestrator.searchfile.space import StageView, default_of
from orchestrator.searchfile.stages import META_PREFIX, match_key, needs_checkpoint
from orchestrator.state.storage import Location
from trainables.checkpoints import CHECKPOINT_FILE, stored_checkpoints
from trainables.record import TrialRecord


class StageError(RuntimeError):
    """A later stage cannot start: its earlier stage lacks a finished trial it needs."""


@dataclass(frozen=True)
class Finished:
    """A finished trial of an earlier stage: its config, MLflow run and final checkpoint."""

    trial_id: str
    config: dict[str, Any]
    run_id: str | None
    checkpoint: str  # a path, or a URI on the search's storage


def finished_trials(stage_folder: Location) -> list[Finished]:
    """Every trial of a stage whose newest complete checkpoint is its last epoch's; a storage
    error is a ``StageError`` (the later stage cannot know what it would start from)."""
    try:
        return _finished_trials(stage_folder)
    except OSError as exc:
        raise StageError(
            f"cannot read the checkpoints of stage {stage_folder.name} at {stage_folder.uri} ({exc}); "
            "`normlab resume` the search once the storage answers"
        ) from exc


def _finished_trials(stage_folder: Location) -> list[Finished]:
    infos = stage_folder.fs.get_file_info(pafs.FileSelector(stage_folder.path, allow_not_found=True))
    found = []
    for info in infos:
        if info.type != pafs.FileType.Directory:
            continue
        stored, _ = stored_checkpoints(stage_folder.fs, info.path)
        for candidate in stored:
            if "record" not in candidate.manifest.extra:
                continue
            record = TrialRecord.from_manifest(candidate.manifest.extra, candidate.manifest.history)
            if record.finished:
                file = (
                    stage_folder.child(info.base_name)
                    .child(posixpath.basename(candidate.folder))
                    .child(CHECKPOINT_FILE)
                )
                found.append(Finished(record.trial_id, record.config, record.run_id, file.uri))
            break
    return found


def seeded_combinations(view: StageView, source: StageView, finished: list[Finished]) -> list[dict[str, Any]]:
    """The grid combinations of a later stage, each that needs one with its earlier trial's
    final checkpoint (``init_from``) and that trial's run id and Ray id (meta keys)."""
    keys = list(source.space.grid)
    index = {match_key(f.config, keys): f for f in finished}
    combos = []
    for combo in view.space.iter_grid_combinations():
        values = {**view.space.fixed, **combo}
        if needs_checkpoint(values):
            match = index.get(match_key(values, keys))
            if match is None:
                wanted = ", ".join(f"{k}={values.get(k, default_of(k))}" for k in keys)
                raise StageError(f"stage {view.name}: no finished trial of stage {source.name} with {wanted}")
            combo = {
                **combo,
                "init_from": match.checkpoint,
                f"{META_PREFIX}init_from_run_id": match.run_id or "",
                f"{META_PREFIX}init_from_trial_id": match.trial_id,
                f"{META_PREFIX}init_from_checkpoint": match.checkpoint,
            }
        combos.append(combo)
    return combos
