"""Whether Ray Tune's saved experiment state holds a trial, and waiting until it does.

Ray Tune keeps what it knows of a search (its trials, the searcher's state) in a
snapshot, ``experiment_state-<session>.json`` and the searcher's files, that the driver
writes every few seconds (``TUNE_GLOBAL_CHECKPOINT_S``: 2 s under normlab) and copies to
the search's storage; ``normlab resume`` restores the newest one. A trial the driver
created after that copy is unknown to the resumed search, and so is the searcher's
suggestion for it: the study rewinds to the snapshot and suggests the same point again.
Whatever such a trial did before the driver died (an MLflow run, a result told to the
Optuna study) would then belong to no trial of the search.

A trial in a worker Ray starts for it cannot get that far: the process start and the
imports take longer than the snapshot period. A trial in a reused worker
(``reuse_actors``) starts at once, and a small one can run to its end within one period.
So ``trainables.ray_trainable`` waits, before the trial does anything, until the newest
saved snapshot lists it (``wait_until_saved``): a driver killed at any moment after that
leaves a snapshot from which the trial resumes.

Plain Python and pyarrow: no Ray (``ray_trainable`` passes the storage and the trial id).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from typing import Any

from pyarrow import fs as pafs

STATE_PATTERN = "experiment_state-*.json"  # Ray Tune's snapshots; it restores the newest name
log = logging.getLogger("normlab.trial")


def newest_state(fs: Any, experiment_path: str) -> str | None:
    """The path of the newest experiment snapshot in ``experiment_path`` (the one Tune restores)."""
    infos = fs.get_file_info(pafs.FileSelector(experiment_path, allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, STATE_PATTERN)]
    return f"{experiment_path.rstrip('/')}/{max(names)}" if names else None


def trial_ids(state: dict[str, Any]) -> set[str]:
    """The ids of the trials an experiment snapshot holds (each trial's state is JSON in it)."""
    ids = set()
    for entry in state.get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        ids.add(str(trial.get("trial_id")))
    return ids


def holds_trial(fs: Any, experiment_path: str, trial_id: str) -> bool:
    """Whether the newest saved snapshot lists ``trial_id``; False while there is none, or while
    it is being rewritten (a copy cut short does not parse)."""
    path = newest_state(fs, experiment_path)
    if path is None:
        return False
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.readall()
        if trial_id.encode() not in data:  # the common case while waiting: no parse
            return False
        return trial_id in trial_ids(json.loads(data))
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return False


def wait_until_saved(
    fs: Any, experiment_path: str, trial_id: str, *, timeout_s: float, poll_s: float | None = None
) -> float:
    """Wait until the newest saved snapshot lists ``trial_id``; the seconds waited. After
    ``timeout_s`` it warns and returns: the trial then runs as it would have without the wait.
    It looks every ``poll_s`` seconds (default: 0.1 on a local disk; 0.5 on object storage,
    where each look lists the folder and reads the snapshot)."""
    if poll_s is None:
        poll_s = 0.1 if isinstance(fs, pafs.LocalFileSystem) else 0.5
    start = time.monotonic()
    while not holds_trial(fs, experiment_path, trial_id):
        waited = time.monotonic() - start
        if waited >= timeout_s:
            log.warning(
                "trial %s: Ray Tune's saved state in %s still does not list it after %.0f s; starting anyway "
                "(a driver killed now would lose what it does)",
                trial_id,
                experiment_path,
                waited,
            )
            return waited
        time.sleep(poll_s)
    return time.monotonic() - start
