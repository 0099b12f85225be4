"""Driver-side Tune callback: every trial's MLflow run ends complete and closed.

A trial records itself, but it cannot always finish the job: its process may die (a
killed worker, a lost node), the tracking server may be down when it ends, a scheduler
may stop it inside ``tune.report``. So when a trial ends, the driver reads the trial's
newest checkpoint manifest (history and run id, not the weights) from storage and syncs
the run from it, then closes a run its trial left open: FINISHED when the last epoch is
in, KILLED when a scheduler stopped it, FAILED with the reason when it errored. The work
runs on one background thread so that a slow or absent server never stalls Tune's event
loop; ``on_experiment_end`` waits for it (``NORMLAB_TRACKING_DRAIN_S``, default 600 s)
and then syncs every trial not yet synced by this driver (a resumed search's earlier
trials). Nothing here raises: at worst it warns, and ``normlab resume`` syncs again.

It also enforces non-retryable failures: when a failed trial left a fatal marker in its
storage (``trainables.trial_storage``), its remaining retries are cancelled (the one
restart Ray has already queued fails at once, see ``trainables.ray_trainable``).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.tracking.trial_runs import MlflowTrialTracker
from trainables.checkpoints import CorruptCheckpointError, read_stored_checkpoint, save_checkpoint, stored_checkpoints
from trainables.record import TrialRecord
from trainables.trial_storage import TrialStorage

log = logging.getLogger("normlab.tracking")
DRAIN_S = float(os.environ.get("NORMLAB_TRACKING_DRAIN_S", 600))
CLOSE_BUDGET_S = 30.0
RETRY_SPACING_S = 10.0  # between two attempts at a trial's run while the server is down


def trial_record(trial: Any) -> tuple[TrialRecord, Any, Any]:
    """The record of a Tune trial from its newest checkpoint manifest (history, run id,
    config), with the storage filesystem and that checkpoint (None if it has none)."""
    fs, path = trial.storage.storage_filesystem, trial.storage.trial_fs_path
    stored, _ = stored_checkpoints(fs, path)
    for candidate in stored:
        if "record" in candidate.manifest.extra:
            return TrialRecord.from_manifest(candidate.manifest.extra, candidate.manifest.history), fs, candidate
    return TrialRecord(trial.trial_id, str(trial), config={}), fs, None


def fatal_reason(trial: Any) -> str | None:
    """The non-retryable failure a trial recorded in its storage, if any."""
    return TrialStorage(trial.storage.storage_filesystem, trial.storage.trial_fs_path).fatal_reason()


def tune_error(trial: Any, default: str = "the trial failed (no error recorded)") -> str:
    """The last line of Tune's error file for ``trial`` (the exception's message), read from
    the driver's staging folder or the trial's storage, whichever has it."""
    name = getattr(trial.run_metadata, "error_filename", None) or "error.txt"
    text = None
    try:
        text = Path(trial.error_file).read_text()
    except Exception:  # no staging folder (Ray not running, another machine): the storage copy
        try:
            with trial.storage.storage_filesystem.open_input_stream(f"{trial.storage.trial_fs_path}/{name}") as fh:
                text = fh.read().decode(errors="replace")
        except Exception:
            return default
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:2000] if lines else default


def trial_error(trial: Any) -> str:
    """Why a trial errored, one line: its non-retryable reason, else Tune's last error line
    (without the exception's module path)."""
    reason = fatal_reason(trial)
    if reason is not None:
        return f"{reason} (non-retryable: not retried)"
    line = tune_error(trial)
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?:Error|Exception)\b)", "", line)


class TrialRunsCallback(tune.Callback):
    """Sync and close each trial's run when it ends; cancel retries of non-retryable failures."""

    def __init__(self, tracker: MlflowTrialTracker) -> None:
        self.tracker = tracker
        self._setup()

    def _setup(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, tuple[Future, Any, str, str]] = {}
        self._done: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment
        return {"tracker": self.tracker}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tracker = state["tracker"]
        self._setup()

    # --------------------------------------------------------------- Tune events
    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = fatal_reason(trial)
        if reason is not None:
            log.warning("trial %s failed without hope of a retry (%s): not retried", trial, reason)
            trial.max_failures = trial.run_metadata.num_failures  # the restart already queued is the last

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(trial, "KILLED", "the trial ended before its last epoch (stopped by the scheduler)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(trial, "FAILED", trial_error(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        deadline = time.monotonic() + DRAIN_S
        for trial in trials:
            if (
                trial.status in ("TERMINATED", "ERROR")
                and trial.trial_id not in self._pending
                and trial.trial_id not in self._done
            ):
                status = "FAILED" if trial.status == "ERROR" else "KILLED"
                self._submit(
                    trial, status, trial_error(trial) if status == "FAILED" else "stopped before its last epoch"
                )
        while self._pending and time.monotonic() < deadline:
            for trial_id, (future, trial, status, reason) in list(self._pending.items()):
                if not future.done():
                    continue
                del self._pending[trial_id]
                outcome = future.result()
                if outcome is None:  # refused: waiting would not help
                    continue
                if outcome:
                    self._done.add(trial_id)
                elif time.monotonic() < deadline:  # the server is still down: try again in a while
                    self._submit(trial, status, reason, delay=RETRY_SPACING_S)
            time.sleep(0.2)
        for future, trial, _, _ in self._pending.values():
            future.cancel()
            log.warning(
                "trial %s: its MLflow run could not be brought up to date before the search ended; "
                "its metrics are safe in its checkpoints: `normlab resume` syncs them",
                trial,
            )
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # --------------------------------------------------------------- the work
    def _submit(self, trial: Any, status: str, reason: str, delay: float = 0.0) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="normlab-runs")
        self._done.discard(trial.trial_id)
        future = self._pool.submit(self._close, trial, status, reason, delay)
        self._pending[trial.trial_id] = (future, trial, status, reason)

    def _close(self, trial: Any, status: str, reason: str, delay: float = 0.0) -> bool | None:
        time.sleep(delay)
        try:
            record, fs, stored = trial_record(trial)
        except Exception as exc:  # storage unreadable: close the run by trial id alone
            log.warning("trial %s: cannot read its checkpoints (%s)", trial, exc)
            record, fs, stored = TrialRecord(trial.trial_id, str(trial), config={}), None, None
        with tempfile.TemporaryDirectory(prefix="normlab-close-") as folder:

            def checkpoint() -> Path | None:  # read only if the run still needs its final checkpoint
                if stored is None or not record.finished:
                    return None
                try:
                    return save_checkpoint(read_stored_checkpoint(fs, stored), Path(folder) / "checkpoint.pt")
                except (CorruptCheckpointError, OSError) as exc:
                    log.warning("trial %s: its final checkpoint is unreadable (%s)", trial, exc)
                    return None

            try:
                return self.tracker.close(record, status, reason, budget_s=CLOSE_BUDGET_S, checkpoint_file=checkpoint)
            except Exception as exc:  # never let tracking end a search; an outage is handled inside
                log.warning("trial %s: closing its run failed: %s", trial, exc)  # close(): this is not one,
                return None  # and would not pass by waiting


class StateBackupCallback(tune.Callback):
    """Keep normlab's last good copy of the search's Ray Tune state (``snapshots``): every 2 s
    until the first copy of the experiment state exists, then every 10 s on a local or
    shared filesystem and every 60 s on an object store."""

    def __init__(self, experiment_uri: str) -> None:
        self.experiment_uri = experiment_uri
        self._backup: Any = None
        self._last = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_uri": self.experiment_uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["experiment_uri"])  # type: ignore[misc]

    def _run(self, force: bool = False) -> None:
        from orchestrator.state import snapshots, storage

        try:  # a backup must never end a search (resolving an s3:// URI may ask the network: retried next step)
            if self._backup is None:
                self._backup = snapshots.StateBackup(storage.resolve(self.experiment_uri))
            interval = 10.0 if self._backup.folder.is_local else 60.0
            if not self._backup.has_experiment_state():
                interval = 2.0  # the first good copy as soon as Tune has written its state
            if force or time.monotonic() - self._last >= interval:
                self._last = time.monotonic()
                self._backup.backup()
        except Exception as exc:
            log.debug("state backup failed: %s", exc)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._run()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._run(force=True)
