"""The thin Ray Tune adapter around ``run_trial``.

``train(config, resolve=..., tracker=...)`` is the function trainable: it turns Ray's
config into a ``TrialConfig`` (``resolve`` merges the search's fixed keys), takes threads
and device from the resources Ray gave the trial, restores from ``tune.get_checkpoint()``,
runs the trial and calls ``tune.report(metrics, checkpoint=...)`` after every epoch.

Tracking is injected: ``tracker`` (any object with the ``TrialTracker`` methods, e.g.
orchestrator's MLflow tracker) opens or re-attaches the trial's run. Its id is stored in
the checkpoint, so a trial resumed after a failure keeps logging to the same run. This
module imports ray but nothing from orchestrator.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ray import tune

from trainables.checkpoints import load_checkpoint, save_checkpoint
from trainables.config import TrialConfig
from trainables.trial import is_final_metric, run_trial

CHECKPOINT_FILE = "checkpoint.pt"
RUN_ID_KEY = "mlflow_run_id"
SHOWN_FIRST = ("clean_acc", "adv_acc", "train_loss", "train_acc")


class TrialTracker(Protocol):
    """Where a trial records itself (e.g. an MLflow child run)."""

    def start(self, config: dict[str, Any], trial_id: str, trial_name: str, run_id: str | None = None) -> str: ...
    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None: ...
    def log_checkpoint(self, run_id: str, checkpoint_file: Path) -> None: ...
    def finish(self, run_id: str, result: dict[str, Any]) -> None: ...
    def fail(self, run_id: str, error: BaseException) -> None: ...
    def stopped(self, run_id: str, reason: str) -> None: ...


def runtime_settings(values: dict[str, Any], cpus: float, gpus: float) -> dict[str, Any]:
    """Threads from the CPUs Ray gave the trial; device ``cuda`` only if it was given a GPU."""
    out: dict[str, Any] = {}
    if values.get("threads") is None:
        out["threads"] = max(1, int(cpus))
    if values.get("device", "auto") == "auto":
        out["device"] = "cuda" if gpus > 0 else "cpu"
    return out


# Checkpoint payloads are pruned here, not by Ray: Ray deletes old checkpoint folders
# while its last experiment snapshot may still point at one of them, so after a hard kill
# of the driver a restore could ask for a folder that is gone. The folders stay (empty
# once pruned); only the newest ``keep`` hold a checkpoint file, and a restore pointed at
# a pruned folder falls back to the newest complete checkpoint of the trial.


def _checkpoint_files(storage: Any) -> list[str]:
    """``checkpoint.pt`` files in this trial's storage folder, oldest first."""
    from pyarrow import fs as pafs

    infos = storage.storage_filesystem.get_file_info(pafs.FileSelector(storage.trial_fs_path, allow_not_found=True))
    folders = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    files = [f"{folder}/{CHECKPOINT_FILE}" for folder in folders]
    found = storage.storage_filesystem.get_file_info(files)
    return [info.path for info in found if info.type == pafs.FileType.File]


def _read(storage: Any, path: str) -> dict[str, Any]:
    with storage.storage_filesystem.open_input_file(path) as fh:
        return load_checkpoint(io.BytesIO(fh.read()), name=path)


def _restore(storage: Any) -> dict[str, Any] | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        file = Path(folder) / CHECKPOINT_FILE
        if file.is_file():
            return load_checkpoint(file)
    files = _checkpoint_files(storage)
    if not files:
        raise FileNotFoundError(f"cannot resume: {checkpoint.path} has no {CHECKPOINT_FILE}, and no other checkpoint of this trial is left")
    return _read(storage, files[-1])


def _prune(storage: Any, keep: int) -> None:
    for path in _checkpoint_files(storage)[:-keep]:
        storage.storage_filesystem.delete_file(path)


def train(
    config: dict[str, Any],
    *,
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    tracker: TrialTracker | None = None,
    checkpoint_every: int = 1,
    keep_checkpoints: int = 2,
) -> None:
    """Ray Tune function trainable: one trial, one report (and maybe a checkpoint) per epoch."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint
    context = tune.get_context()
    resources = context.get_trial_resources().required_resources
    values = resolve(config) if resolve else dict(config)
    values.update(runtime_settings(values, resources.get("CPU", 1), resources.get("GPU", 0)))
    cfg = TrialConfig.model_validate(values)
    storage = context.get_storage()
    checkpoint = _restore(storage)
    run_id = None
    if tracker is not None:
        previous = checkpoint.get(RUN_ID_KEY) if checkpoint else None
        run_id = tracker.start(cfg.model_dump(mode="json"), context.get_trial_id(), context.get_trial_name(), previous)

    finished: list[int] = []  # the last epoch's, once the run is closed

    def on_epoch(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        if tracker is not None:
            tracker.log_epoch(run_id, epoch, metrics)
        metrics = {k: metrics[k] for k in SHOWN_FIRST if k in metrics} | metrics  # Tune's table shows the first few
        last = epoch == cfg.epochs
        if epoch % checkpoint_every and not last:
            tune.report(metrics)
            return
        state[RUN_ID_KEY] = run_id
        with tempfile.TemporaryDirectory(prefix="normlab-ckpt-") as folder:
            file = save_checkpoint(state, Path(folder) / CHECKPOINT_FILE)
            if last and tracker is not None:
                # the run is complete before the last report: a scheduler may end the
                # trial inside that report (ASHA does at max_t)
                tracker.log_checkpoint(run_id, file)
                tracker.finish(run_id, summary(state, metrics, cfg))
                finished.append(epoch)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        _prune(storage, keep_checkpoints)

    try:
        result = run_trial(cfg, on_epoch=on_epoch, checkpoint=checkpoint)
    except SystemExit:  # tune.report's way of ending a trial that the scheduler stopped
        if tracker is not None and not finished:
            tracker.stopped(run_id, "stopped early by the scheduler")
        raise
    except BaseException as error:
        if tracker is not None:
            tracker.fail(run_id, error)
        raise
    if tracker is not None and not finished:  # resumed from the last epoch's checkpoint: no epoch left to run
        tracker.finish(run_id, result.to_dict())


def summary(state: dict[str, Any], metrics: dict[str, float], cfg: TrialConfig) -> dict[str, Any]:
    """The trial's result as ``TrialResult.to_dict()`` lays it out, from its last epoch."""
    final = {k: v for k, v in metrics.items() if is_final_metric(k)}
    return {"config": state["config"], "history": state["history"], "final": final,
            "eval_batch_size": cfg.eval_batch_size}

