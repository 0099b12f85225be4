"""The thin Ray Tune adapter around ``run_trial``.

``train(config, resolve=..., tracker=...)`` is the function trainable: it turns Ray's
config into a ``TrialConfig`` (``resolve`` merges the search's fixed keys), takes threads
and device from the resources Ray gave the trial, restores from the newest *complete*
checkpoint in the trial's storage, runs the trial and calls ``tune.report(metrics,
checkpoint=...)`` after every epoch.

Exactly-once tracking. Every checkpoint carries a manifest with the trial's whole metric
history (``trainables.checkpoints``); the tracker (any object with the ``TrialTracker``
methods, e.g. orchestrator's MLflow tracker, injected so this module imports nothing
from orchestrator) makes the trial's run match a ``TrialRecord``: it logs only the epochs
the run does not hold yet. So whatever dies when, a restarted trial re-logs nothing it
logged before and catches up on what it had not, and a tracking server that is down only
delays metrics: they stay in the record and the checkpoint, and the next sync (the next
epoch, the driver when the trial ends, ``normlab resume``) writes them.

Restore ignores which checkpoint Ray remembers: a worker or driver killed between
persisting a checkpoint and Ray's bookkeeping leaves a newer complete one in storage,
and a truncated or corrupt newest one (its manifest does not match) falls back to the
newest complete one, noted on the run.

Failures are handled by kind (``trainables.failures``): a non-retryable one (NaN loss,
bad configuration, foreign checkpoint, full storage) is recorded on the run and in a
marker in the trial's storage, so a restart Ray attempts anyway fails at once with the
same reason instead of training again. This module imports ray but nothing from
orchestrator.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from ray import tune

from trainables import faults
from trainables.checkpoints import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    CorruptCheckpointError,
    delete_stored_checkpoint,
    read_stored_checkpoint,
    read_unmanifested_checkpoint,
    save_checkpoint,
    stored_checkpoints,
    unmanifested_checkpoints,
)
from trainables.config import TrialConfig, format_validation_error
from trainables.environment import environment_tags
from trainables.failures import (
    NonRetryableError,
    StorageFullError,
    TrialConfigError,
    describe,
    is_disk_full,
    is_retryable,
)
from trainables.metrics import EPOCH_METRICS
from trainables.record import TrialRecord, TrialTracker
from trainables.trial import run_trial

RUN_ID_KEY = "mlflow_run_id"
FATAL_FILE = "normlab_fatal.json"
log = logging.getLogger("normlab.trial")


def _seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


# How long a trial waits for the tracking server: per epoch, then at the end. After that
# it carries on; what it could not log waits in its checkpoints for the next sync.
EPOCH_SYNC_S = _seconds("NORMLAB_TRACKING_RETRY_S", 20.0)
FINAL_SYNC_S = _seconds("NORMLAB_TRACKING_FINAL_WAIT_S", 120.0)


def runtime_settings(values: dict[str, Any], cpus: float, gpus: float) -> dict[str, Any]:
    """Threads from the CPUs Ray gave the trial; device ``cuda`` only if it was given a GPU."""
    out: dict[str, Any] = {}
    if values.get("threads") is None:
        out["threads"] = max(1, int(cpus))
    if values.get("device", "auto") == "auto":
        out["device"] = auto_device(gpus)
    return out


def check_gpu_share(device: str, gpus: float) -> None:
    """A GPU share on a node whose torch cannot use CUDA is a ``RuntimeError`` that says so,
    instead of a complaint about a device setting the user never made (retried: another node
    may be set up right)."""
    if gpus > 0 and device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"Ray gave this trial {gpus:g} GPU, but torch on this node cannot use CUDA (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): "
            "install a CUDA build of torch on GPU nodes, or start this node with --num-gpus=0"
        )


def auto_device(gpus: float) -> str:
    """What ``device=auto`` means for a trial given ``gpus`` of a GPU by Ray: ``cuda`` (Ray makes
    its GPUs the only visible ones, so device 0 is its share) or ``cpu``."""
    return "cuda" if gpus > 0 else "cpu"


def runtime_tags(values: dict[str, Any], gpus: float) -> dict[str, str]:
    """Facts of this attempt for the run: device, threads, node, GPU ids and share, and the node's
    environment (lock hash and package versions: ``trainables.environment``)."""
    import ray

    context = ray.get_runtime_context()
    return {
        "normlab.device": str(values.get("device")),
        "normlab.device_auto": auto_device(gpus),
        "normlab.threads": str(values.get("threads")),
        "normlab.node_id": context.get_node_id(),
        "normlab.node_ip": ray.util.get_node_ip_address(),
        "normlab.gpu_share": f"{gpus:g}",
        "normlab.gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids()),
        "normlab.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        **environment_tags(),
    }


# ----------------------------------------------------------------- trial storage


class TrialStorage:
    """This trial's folder in the search's storage (any pyarrow filesystem)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

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

    def fatal(self) -> dict[str, Any] | None:
        """The non-retryable failure recorded by an earlier attempt, if any."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{FATAL_FILE}") as fh:
                return json.loads(fh.read())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def record_fatal(self, reason: str) -> None:
        try:
            self.fs.create_dir(self.path)
            with self.fs.open_output_stream(f"{self.path}/{FATAL_FILE}") as fh:
                fh.write(json.dumps({"error": reason}).encode())
        except OSError as exc:  # e.g. the storage is full: the run's tag still says why
            log.warning("could not record the failure in %s: %s", self.path, exc)


# ------------------------------------------------------------------- the trainable


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
    storage_context = context.get_storage()
    storage = TrialStorage(storage_context.storage_filesystem, storage_context.trial_fs_path)
    record = TrialRecord(context.get_trial_id(), context.get_trial_name(), config={})
    earlier = storage.fatal()
    if earlier:  # Ray restarts every failure; this one would only fail again
        raise NonRetryableError(f"{earlier['error']} (a non-retryable failure of an earlier attempt; not retried)")

    values = resolve(config) if resolve else dict(config)
    # the keys that vary, reported with every result: Tune's tables and ResultGrid.get_dataframe() show
    # them as knobs/<key> (its own config/* columns hold Ray's unresolved config)
    varying = getattr(resolve, "varying", None)
    knobs = {k: v for k, v in (varying(config) if varying else config).items() if not k.startswith("_")}
    # keys starting with "_" are facts for the run (e.g. the earlier stage's run it starts from), not knobs
    facts = {f"normlab.{k[1:]}": str(values.pop(k)) for k in [k for k in values if k.startswith("_")]}
    record.config = values
    try:
        values.update(runtime_settings(values, resources.get("CPU", 1), resources.get("GPU", 0)))
        check_gpu_share(str(values.get("device")), resources.get("GPU", 0))
    except RuntimeError as exc:
        _fail(record, tracker, storage, exc)
    try:
        cfg = TrialConfig.model_validate(values)
    except ValidationError as exc:
        _fail(
            record,
            tracker,
            storage,
            TrialConfigError("invalid trial configuration: " + format_validation_error(exc).replace("\n", "; ")),
        )
    record.config, record.epochs = cfg.model_dump(mode="json"), cfg.epochs
    record.tags = {**runtime_tags(values, resources.get("GPU", 0)), **facts}
    checkpoint, notes = storage.restore()
    if notes:
        record.tags["normlab.checkpoint_fallback"] = "; ".join(notes)[:5000]
        log.warning("trial %s: %s", record.trial_name, "; ".join(notes))
    if checkpoint is not None:
        record.run_id = checkpoint.get(RUN_ID_KEY)
        record.history = list(checkpoint.get("history", []))
    if tracker is not None:
        tracker.sync(record, budget_s=EPOCH_SYNC_S)  # opens the run; catches up what the checkpoint holds
    faults.training(record.trial_name, len(record.history) + 1)

    def on_epoch(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        record.history = list(state["history"])
        last = epoch == cfg.epochs
        faults.maybe_kill("before_sync", record.trial_name, epoch)
        if tracker is not None:  # before the checkpoint: a kill between the two re-logs nothing (see module doc)
            tracker.sync(record, budget_s=EPOCH_SYNC_S)
        save = last or epoch % checkpoint_every == 0
        with tempfile.TemporaryDirectory(prefix="normlab-ckpt-") as folder:
            file = None
            if save:
                state[RUN_ID_KEY] = record.run_id
                file = _save(state, Path(folder) / CHECKPOINT_FILE, record, epoch)
            if last and tracker is not None:
                # the run is complete before the last report: a scheduler may end the trial
                # inside that report (ASHA does at max_t), and nothing after it would run
                tracker.sync(record, budget_s=FINAL_SYNC_S, checkpoint_file=file, finish=True)
            faults.maybe_kill("after_sync", record.trial_name, epoch)
            try:
                tune.report(_shown(metrics, knobs), checkpoint=tune.Checkpoint.from_directory(folder) if save else None)
            except OSError as exc:
                if is_disk_full(exc):
                    raise StorageFullError(
                        f"no space left on the storage path while saving the epoch {epoch} checkpoint "
                        f"({exc}); free space, then `normlab resume`"
                    ) from exc
                raise
        if save:
            storage.fsync()
            faults.maybe_kill("after_report", record.trial_name, epoch)
            storage.prune(keep_checkpoints)
        faults.training(record.trial_name, epoch + 1)

    try:
        run_trial(cfg, on_epoch=on_epoch, checkpoint=checkpoint)
    except SystemExit:  # tune.report's way of ending a trial the scheduler stopped: the driver closes its run
        raise
    except BaseException as error:
        _fail(record, tracker, storage, error)
    if checkpoint is not None and int(checkpoint["epoch"]) >= cfg.epochs and record.history:
        # resumed from the last epoch's checkpoint (its report was lost with the process that
        # made it): nothing left to train, only to record, and to tell Tune the trial's result
        if tracker is not None:
            with tempfile.TemporaryDirectory(prefix="normlab-ckpt-") as folder:
                file = _save(checkpoint, Path(folder) / CHECKPOINT_FILE, record, int(checkpoint["epoch"]))
                tracker.sync(record, budget_s=FINAL_SYNC_S, checkpoint_file=file, finish=True)
        tune.report(_shown(record.history[-1], knobs))


def _shown(metrics: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """The metrics in the order Tune's progress table should show them (it shows the first few),
    and the trial's varying knobs."""
    return {k: metrics[k] for k in EPOCH_METRICS if k in metrics} | metrics | {"knobs": knobs}


def _save(state: dict[str, Any], path: Path, record: TrialRecord, epoch: int) -> Path:
    try:
        return save_checkpoint(state, path, extra=record.manifest_extra())
    except OSError as exc:
        if is_disk_full(exc):
            raise StorageFullError(
                f"no space left on this node's temporary folder while saving the epoch {epoch} checkpoint ({exc})"
            ) from exc
        raise


def _fail(record: TrialRecord, tracker: TrialTracker | None, storage: TrialStorage, error: BaseException) -> None:
    """Record why the trial failed (run tag, and a marker when retrying cannot help), then raise."""
    retryable = is_retryable(error)
    reason = describe(error)
    if not retryable:
        storage.record_fatal(reason)
    if tracker is not None:
        tracker.fail(record, reason, retryable=retryable, budget_s=EPOCH_SYNC_S)
    raise error
