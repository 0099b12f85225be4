"""The thin Ray Tune adapter around ``run_trial``.

``train(config, resolve=..., tracker=...)`` is the function trainable, shaped like Ray
Tune's own examples: restore -> loop -> report. Its bookkeeping lives in named helpers:

- ``_wait_until_saved``: nothing happens until Ray Tune's saved state lists the trial
  (``trainables.tune_state``), so a driver killed at any moment never loses a trial that
  has done something;
- ``_begin`` and ``_prepare``: the trial's record and storage from Ray's context (refused
  at once when an earlier attempt failed for good), and its ``TrialConfig`` from Ray's
  config (``resolve`` merges the search's fixed keys) and the resources Ray gave it
  (threads and device);
- ``_restore``: the newest *complete* checkpoint in the trial's storage, fallbacks noted
  on the run, the run opened (or re-attached) and caught up with what the checkpoint holds;
- ``_EpochReporter``: after every epoch, in this order: sync the run, save the
  checkpoint, (last epoch) finish the run, ``tune.report(metrics, checkpoint=...)``,
  then fsync and prune the checkpoints in storage;
- ``_report_resumed_final``: a trial resumed from its last epoch's checkpoint only
  records, and reports its result again.

Exactly-once tracking. Every checkpoint carries a manifest with the trial's whole metric
history (``trainables.checkpoints``); the tracker (any object with the ``TrialTracker``
methods, e.g. orchestrator's MLflow tracker, injected so this module imports nothing
from orchestrator) makes the trial's run match a ``TrialRecord``: it logs only the epochs
the run does not hold yet. Each epoch syncs the run *before* its checkpoint is saved, and
the last epoch finishes the run *before* its report (a scheduler may end the trial inside
``tune.report``). So whatever dies when, a restarted trial re-logs nothing it logged
before and catches up on what it had not, and a tracking server that is down only delays
metrics: they stay in the record and the checkpoint, and the next sync (the next epoch,
the driver when the trial ends, ``normlab resume``) writes them. The fault-injection
points of ``trainables.faults`` (``before_sync``, ``after_sync``, ``after_report``) sit
between these steps.

Restore ignores which checkpoint Ray remembers: a worker or driver killed between
persisting a checkpoint and Ray's bookkeeping leaves a newer complete one in storage,
and a truncated or corrupt newest one (its manifest does not match) falls back to the
newest complete one, noted on the run (``trainables.trial_storage``).

Failures are handled by kind (``trainables.failures``): a non-retryable one (NaN loss,
bad configuration, foreign checkpoint, full storage) is recorded on the run and in a
fatal marker in the trial's storage (``TrialStorage.record_fatal``), so a restart Ray
attempts anyway fails at once with the same reason instead of training again. A
``SystemExit`` (``tune.report``'s way of ending a trial a scheduler stopped) passes
through untouched. This module imports ray but nothing from orchestrator.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from pydantic import ValidationError
from ray import tune

from trainables import faults, profiling, tune_state
from trainables.checkpoints import CHECKPOINT_FILE, save_checkpoint
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
from trainables.trial_storage import TrialStorage

RUN_ID_KEY = "mlflow_run_id"
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
# How long a trial waits for Ray Tune's saved state to list it before it starts anyway
TUNE_STATE_WAIT_S = _seconds("NORMLAB_TUNE_STATE_WAIT_S", 60.0)


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
    profiling.set_context(trial=tune.get_context().get_trial_name())
    _wait_until_saved()
    with profiling.span("trial.prepare"):
        attempt = _begin(tracker)
        cfg, knobs = _prepare(attempt, config, resolve)
        checkpoint = _restore(attempt)
    reporter = _EpochReporter(attempt, cfg.epochs, knobs, every=checkpoint_every, keep=keep_checkpoints)
    try:
        run_trial(cfg, on_epoch=reporter.on_epoch, checkpoint=checkpoint)
    except SystemExit:  # tune.report's way of ending a trial the scheduler stopped: the driver closes its run
        raise
    except BaseException as error:
        attempt.fail(error)
    if checkpoint is not None and int(checkpoint["epoch"]) >= cfg.epochs and attempt.record.history:
        _report_resumed_final(attempt, checkpoint, knobs)  # there was nothing left to train


@dataclass
class _Attempt:
    """This attempt at a trial (Ray restarts a failed trial as a new attempt): its record, its
    storage, and who tracks it (None: nobody)."""

    record: TrialRecord
    storage: TrialStorage
    tracker: TrialTracker | None

    def sync(self) -> None:
        """Bring the run up to date (opening or re-attaching it), trying for ``EPOCH_SYNC_S``."""
        if self.tracker is not None:
            with profiling.span("trial.tracking"):
                self.tracker.sync(self.record, budget_s=EPOCH_SYNC_S)

    def finish(self, checkpoint_file: Path | None) -> None:
        """Bring the run up to date with the finished trial and close it, trying for ``FINAL_SYNC_S``."""
        if self.tracker is not None:
            with profiling.span("trial.tracking", final=True):
                self.tracker.sync(self.record, budget_s=FINAL_SYNC_S, checkpoint_file=checkpoint_file, finish=True)

    def fail(self, error: BaseException) -> NoReturn:
        """Record why the trial failed (run tag, and the fatal marker when retrying cannot help), then raise."""
        retryable = is_retryable(error)
        reason = describe(error)
        if not retryable:
            self.storage.record_fatal(reason)
        if self.tracker is not None:
            self.tracker.fail(self.record, reason, retryable=retryable, budget_s=EPOCH_SYNC_S)
        raise error


def _wait_until_saved() -> None:
    """Do nothing until Ray Tune's saved state lists this trial (``trainables.tune_state``): a
    driver killed before that would lose the trial, and whatever it had logged with it.

    A trial whose folder holds a checkpoint already (a retry, a resumed search) does not wait:
    the attempt that wrote it had waited, and every later snapshot lists the trial too. When
    Ray Tune cannot save (a full disk cut its newest snapshot short), a retried trial would
    otherwise wait the whole ``TUNE_STATE_WAIT_S`` for nothing."""
    context = tune.get_context()
    ray_storage = context.get_storage()
    if ray_storage is None:  # not under Tune
        return
    if TrialStorage(ray_storage.storage_filesystem, ray_storage.trial_fs_path).has_checkpoint_folder():
        return
    with profiling.span("trial.wait_for_tune_state"):
        tune_state.wait_until_saved(
            ray_storage.storage_filesystem,
            ray_storage.experiment_fs_path,
            context.get_trial_id(),
            timeout_s=TUNE_STATE_WAIT_S,
        )


def _begin(tracker: TrialTracker | None) -> _Attempt:
    """This attempt's record and storage, from Ray's context. It is refused at once when an earlier
    attempt failed for good: Ray restarts every failure, and this one would only fail again."""
    context = tune.get_context()
    ray_storage = context.get_storage()
    attempt = _Attempt(
        TrialRecord(context.get_trial_id(), context.get_trial_name(), config={}),
        TrialStorage(ray_storage.storage_filesystem, ray_storage.trial_fs_path),
        tracker,
    )
    earlier = attempt.storage.fatal()
    if earlier:
        raise NonRetryableError(f"{earlier['error']} (a non-retryable failure of an earlier attempt; not retried)")
    return attempt


def _prepare(
    attempt: _Attempt, config: dict[str, Any], resolve: Callable[[dict[str, Any]], dict[str, Any]] | None
) -> tuple[TrialConfig, dict[str, Any]]:
    """The trial's ``TrialConfig`` from Ray's ``config`` (``resolve`` merges the search's fixed keys)
    and the resources Ray gave the trial, and its knobs; fills in the record's config, epochs and
    tags. A configuration that cannot run fails the trial (``_validated``)."""
    record = attempt.record
    values = resolve(config) if resolve else dict(config)
    knobs = _knobs(config, resolve)
    # keys starting with "_" are facts for the run (e.g. the earlier stage's run it starts from), not knobs
    facts = {f"normlab.{k[1:]}": str(values.pop(k)) for k in [k for k in values if k.startswith("_")]}
    record.config = values  # what the run shows if they do not validate
    resources = tune.get_context().get_trial_resources().required_resources
    cfg = _validated(attempt, values, cpus=resources.get("CPU", 1), gpus=resources.get("GPU", 0))
    record.config, record.epochs = cfg.model_dump(mode="json"), cfg.epochs
    record.tags = {**runtime_tags(values, resources.get("GPU", 0)), **facts}
    return cfg, knobs


def _knobs(config: dict[str, Any], resolve: Callable[[dict[str, Any]], dict[str, Any]] | None) -> dict[str, Any]:
    """The keys that vary, reported with every result: Tune's tables and ResultGrid.get_dataframe()
    show them as knobs/<key> (its own config/* columns hold Ray's unresolved config)."""
    varying = getattr(resolve, "varying", None)
    return {k: v for k, v in (varying(config) if varying else config).items() if not k.startswith("_")}


def _validated(attempt: _Attempt, values: dict[str, Any], *, cpus: float, gpus: float) -> TrialConfig:
    """``values`` given threads and device from the resources Ray gave the trial (in place), then
    validated; a GPU share this node cannot use, or a config that does not validate, fails the trial."""
    try:
        values.update(runtime_settings(values, cpus, gpus))
        check_gpu_share(str(values.get("device")), gpus)
    except RuntimeError as exc:
        attempt.fail(exc)
    try:
        return TrialConfig.model_validate(values)
    except ValidationError as exc:
        attempt.fail(
            TrialConfigError("invalid trial configuration: " + format_validation_error(exc).replace("\n", "; "))
        )


def _restore(attempt: _Attempt) -> dict[str, Any] | None:
    """The newest complete checkpoint in the trial's storage (None: start fresh), with any fallback
    noted on the run; the run opened (or re-attached) and caught up with what the checkpoint holds."""
    record = attempt.record
    checkpoint, notes = attempt.storage.restore()
    if notes:
        record.tags["normlab.checkpoint_fallback"] = "; ".join(notes)[:5000]
        log.warning("trial %s: %s", record.trial_name, "; ".join(notes))
    if checkpoint is not None:
        record.run_id = checkpoint.get(RUN_ID_KEY)
        record.history = list(checkpoint.get("history", []))
    attempt.sync()  # opens the run; catches up what the checkpoint holds
    faults.training(record.trial_name, len(record.history) + 1)
    return checkpoint


class _EpochReporter:
    """``run_trial``'s ``on_epoch`` for one attempt. After each epoch, in this order: sync the run,
    save a checkpoint (every ``every`` epochs, and the last), finish the run (the last epoch), report
    to Tune, then fsync the checkpoint and prune old ones to ``keep``. The order is what keeps
    tracking exactly-once (module doc); the fault-injection points sit between the steps."""

    def __init__(self, attempt: _Attempt, epochs: int, knobs: dict[str, Any], *, every: int, keep: int) -> None:
        self.attempt, self.epochs, self.knobs, self.every, self.keep = attempt, epochs, knobs, every, keep

    def on_epoch(self, epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        name, last = self.attempt.record.trial_name, epoch == self.epochs
        save = last or epoch % self.every == 0
        self.attempt.record.history = list(state["history"])
        faults.maybe_kill("before_sync", name, epoch)
        self.attempt.sync()  # before the checkpoint: a kill between the two re-logs nothing (see module doc)
        with tempfile.TemporaryDirectory(prefix="normlab-ckpt-") as folder:
            with profiling.span("trial.checkpoint"):
                file = self._checkpoint(state, Path(folder), epoch) if save else None
            if last:
                # the run is complete before the last report: a scheduler may end the trial
                # inside that report (ASHA does at max_t), and nothing after it would run
                self.attempt.finish(file)
            faults.maybe_kill("after_sync", name, epoch)
            with profiling.span("trial.report", epoch=epoch):  # Tune persists the checkpoint here
                _report(_shown(metrics, self.knobs), folder if save else None, epoch)
        if save:
            with profiling.span("trial.checkpoint"):
                self.attempt.storage.fsync()
                faults.maybe_kill("after_report", name, epoch)
                self.attempt.storage.prune(self.keep)
        faults.training(name, epoch + 1)

    def _checkpoint(self, state: dict[str, Any], folder: Path, epoch: int) -> Path:
        """Save ``state`` in ``folder``, with the run's id (a restart re-attaches to the run)."""
        state[RUN_ID_KEY] = self.attempt.record.run_id
        return _save(state, folder / CHECKPOINT_FILE, self.attempt.record, epoch)


def _report(metrics: dict[str, Any], checkpoint_folder: str | None, epoch: int) -> None:
    """``tune.report`` with the checkpoint in ``checkpoint_folder`` (None: no checkpoint); a full
    storage path fails the trial for good (``StorageFullError``)."""
    try:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
        tune.report(metrics, checkpoint=checkpoint)
    except OSError as exc:
        if is_disk_full(exc):
            raise StorageFullError(
                f"no space left on the storage path while saving the epoch {epoch} checkpoint "
                f"({exc}); free space, then `normlab resume`"
            ) from exc
        raise


def _report_resumed_final(attempt: _Attempt, checkpoint: dict[str, Any], knobs: dict[str, Any]) -> None:
    """Resumed from the last epoch's checkpoint (its report was lost with the process that made
    it): nothing left to train, only to record, and to tell Tune the trial's result."""
    if attempt.tracker is not None:
        with tempfile.TemporaryDirectory(prefix="normlab-ckpt-") as folder:
            file = _save(checkpoint, Path(folder) / CHECKPOINT_FILE, attempt.record, int(checkpoint["epoch"]))
            attempt.finish(file)
    tune.report(_shown(attempt.record.history[-1], knobs))


def _shown(metrics: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """The metrics in the order Tune's progress table should show them (it shows the first few),
    and the trial's varying knobs."""
    return {k: metrics[k] for k in EPOCH_METRICS if k in metrics} | metrics | {"knobs": knobs}


def _save(state: dict[str, Any], path: Path, record: TrialRecord, epoch: int) -> Path:
    """Save a checkpoint with the record in its manifest; a full temporary folder fails the trial for good."""
    try:
        return save_checkpoint(state, path, extra=record.manifest_extra())
    except OSError as exc:
        if is_disk_full(exc):
            raise StorageFullError(
                f"no space left on this node's temporary folder while saving the epoch {epoch} checkpoint ({exc})"
            ) from exc
        raise
