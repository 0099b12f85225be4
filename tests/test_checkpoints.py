"""Checkpoint files and their manifests: written whole, trusted only when they match.

Also the trainable's view of a trial's storage (``TrialStorage``): restore takes the
newest *complete* checkpoint whatever Ray remembers, says which ones it skipped and why,
and pruning keeps the newest ones by epoch.
"""

from __future__ import annotations

import json

import pytest
import torch
from pyarrow import fs as pafs

from trainables import checkpoints
from trainables.checkpoints import (
    CorruptCheckpointError,
    Manifest,
    load_checkpoint,
    manifest_path,
    save_checkpoint,
    stored_checkpoints,
)
from trainables.trial_storage import TrialStorage


def state(epoch: int) -> dict:
    return {
        "format": "normlab.checkpoint/1",
        "epoch": epoch,
        "model": {"w": torch.full((64, 64), float(epoch))},
        "history": [{"epoch": e, "train_loss": 1.0 / e} for e in range(1, epoch + 1)],
    }


def test_a_checkpoint_round_trips_with_its_manifest(tmp_path):
    path = save_checkpoint(state(3), tmp_path / "last.pt", extra={"run": "abc"})
    manifest = Manifest.from_json(manifest_path(path).read_bytes(), "m")
    assert manifest.epoch == 3 and manifest.bytes == path.stat().st_size and manifest.extra == {"run": "abc"}
    assert [h["epoch"] for h in manifest.history] == [1, 2, 3]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64, 64), 3.0))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_truncated_and_corrupt_files_are_refused_against_their_manifest(tmp_path):
    path = save_checkpoint(state(2), tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # torch.load alone would load this without complaint
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_checkpoint(path)
    manifest_path(path).unlink()  # a file without a manifest (a user's own) is loaded as it is
    assert load_checkpoint(path)["epoch"] == 2


def make_trial(tmp_path, epochs, damage=None):
    """Checkpoint folders as Ray lays them out, one epoch each; ``damage``: {epoch: how}."""
    trial = tmp_path / "trial"
    for i, epoch in enumerate(epochs):
        folder = trial / f"checkpoint_{i:06d}"
        path = save_checkpoint(state(epoch), folder / "checkpoint.pt", extra={"record": {"trial_id": "t"}})
        how = (damage or {}).get(epoch)
        if how == "truncate":
            path.write_bytes(path.read_bytes()[:100])
        elif how == "no-manifest":
            manifest_path(path).unlink()
        elif how == "bad-manifest":
            manifest_path(path).write_text('{"epoch": 5, "sha2')
    return TrialStorage(pafs.LocalFileSystem(), str(trial))


def test_restore_takes_the_newest_complete_checkpoint_by_epoch_not_by_folder(tmp_path):
    # folder indices do not follow epochs after a restart from a checkpoint Ray did not know about
    storage = make_trial(tmp_path, epochs=[1, 2, 5, 3, 4])
    checkpoint, notes = storage.restore()
    assert checkpoint["epoch"] == 5 and notes == []


@pytest.mark.parametrize("how", ["truncate", "no-manifest", "bad-manifest"])
def test_restore_falls_back_past_a_damaged_newest_checkpoint_and_says_so(tmp_path, how):
    storage = make_trial(tmp_path, epochs=[1, 2, 3], damage={3: how})
    checkpoint, notes = storage.restore()
    assert checkpoint["epoch"] == 2
    text = "; ".join(notes)
    assert "checkpoint_000002" in text and "resumed from epoch 2" in text
    expected = {
        "truncate": "truncated",
        "no-manifest": "without its manifest",
        "bad-manifest": "unreadable checkpoint manifest",
    }
    assert expected[how] in text


def test_restore_with_no_complete_checkpoint_starts_fresh_and_says_so(tmp_path):
    storage = make_trial(tmp_path, epochs=[1], damage={1: "truncate"})
    checkpoint, notes = storage.restore()
    assert checkpoint is None and "started from scratch" in notes[-1]
    assert TrialStorage(pafs.LocalFileSystem(), str(tmp_path / "nothing")).restore() == (None, [])


def test_a_damaged_checkpoint_is_removed_once_skipped_so_pruning_keeps_good_ones(tmp_path):
    storage = make_trial(tmp_path, epochs=[1, 2, 3], damage={3: "truncate"})
    checkpoint, notes = storage.restore()
    assert checkpoint["epoch"] == 2 and "(removed)" in notes[0]
    assert [s.epoch for s in stored_checkpoints(storage.fs, storage.path)[0]] == [2, 1]
    # training goes on from epoch 2: the new epoch 3 is kept, not pruned in favour of the damaged one
    save_checkpoint(state(3), tmp_path / "trial" / "checkpoint_000003" / "checkpoint.pt")
    storage.prune(keep=2)
    assert [s.epoch for s in stored_checkpoints(storage.fs, storage.path)[0]] == [3, 2]
    assert storage.restore()[0]["epoch"] == 3


def test_a_storage_error_is_not_taken_for_a_damaged_checkpoint(tmp_path):
    """Anything but a missing file (here: a folder where the payload should be) propagates, so the
    trial is retried instead of falling back or starting over, and nothing is removed."""
    storage = make_trial(tmp_path, epochs=[1, 2])
    payload = tmp_path / "trial" / "checkpoint_000001" / "checkpoint.pt"
    payload.unlink()
    payload.mkdir()
    with pytest.raises(OSError) as caught:
        storage.restore()
    assert not isinstance(caught.value, CorruptCheckpointError)
    assert manifest_path(payload).is_file()


def test_checkpoints_without_manifests_from_an_earlier_normlab_are_resumed(tmp_path):
    storage = make_trial(tmp_path, epochs=[1, 2, 3], damage={1: "no-manifest", 2: "no-manifest", 3: "no-manifest"})
    (tmp_path / "trial" / "checkpoint_000002" / "checkpoint.pt").write_bytes(b"cut short")
    checkpoint, notes = storage.restore()
    assert checkpoint["epoch"] == 2  # the newest that loads
    assert "resumed from epoch 2" in notes[-1] and "without a manifest" in notes[-1]
    assert "checkpoint_000002/checkpoint.pt is not a readable PyTorch checkpoint" in "; ".join(notes)


def test_a_manifest_from_a_newer_normlab_is_read_and_a_foreign_format_refused(tmp_path):
    path = save_checkpoint(state(2), tmp_path / "last.pt")
    raw = json.loads(manifest_path(path).read_text())
    newer = Manifest.from_json(json.dumps({**raw, "written_by": "normlab 9"}).encode(), "m")
    assert newer.epoch == 2
    with pytest.raises(CorruptCheckpointError, match="format 'other/2'"):
        Manifest.from_json(json.dumps({**raw, "format": "other/2"}).encode(), "m")


def test_saving_over_a_checkpoint_never_leaves_a_manifest_of_another_file(tmp_path):
    path = save_checkpoint(state(2), tmp_path / "last.pt")
    real_write = checkpoints.write_atomic

    def crash_after_payload(target, data):
        real_write(target, data)
        if str(target).endswith(".pt"):
            raise KeyboardInterrupt  # Ctrl-C between the payload and its manifest

    checkpoints.write_atomic = crash_after_payload
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(state(3), path)
    finally:
        checkpoints.write_atomic = real_write
    assert not manifest_path(path).exists()
    assert load_checkpoint(path)["epoch"] == 3  # the new file, read unchecked, not refused as corrupt


def test_prune_keeps_the_newest_by_epoch_and_leaves_the_folders(tmp_path):
    storage = make_trial(tmp_path, epochs=[1, 2, 5, 3, 4])
    storage.prune(keep=2)
    stored, _ = stored_checkpoints(storage.fs, storage.path)
    assert [s.epoch for s in stored] == [5, 4]
    assert len(list((tmp_path / "trial").glob("checkpoint_*"))) == 5  # Ray's state may still name them
    assert len(list((tmp_path / "trial").glob("checkpoint_*/checkpoint.pt"))) == 2


def test_fatal_marker_round_trip(tmp_path):
    storage = TrialStorage(pafs.LocalFileSystem(), str(tmp_path / "trial"))
    assert storage.fatal() is None
    storage.record_fatal("NonFiniteLossError: nan at epoch 3")
    assert storage.fatal() == {"error": "NonFiniteLossError: nan at epoch 3"}
    assert json.loads((tmp_path / "trial" / "normlab_fatal.json").read_text())["error"].startswith("NonFinite")
    assert storage.fatal_reason() == "NonFiniteLossError: nan at epoch 3"
    assert storage.clear_fatal() is True
    assert storage.fatal() is None and storage.fatal_reason() is None
    assert storage.clear_fatal() is False


@pytest.mark.parametrize("text", ['{"error": "trunc', "{}", ""])
def test_an_unreadable_or_reasonless_fatal_marker_is_no_reason(tmp_path, text):
    storage = TrialStorage(pafs.LocalFileSystem(), str(tmp_path / "trial"))
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "normlab_fatal.json").write_text(text)
    assert storage.fatal_reason() is None
    assert storage.fatal() == ({} if text == "{}" else None)  # an empty marker refuses nothing either
