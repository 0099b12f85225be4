"""normlab's last good copy of Ray Tune's experiment state, and the repair that uses it."""

from __future__ import annotations

import json
import pickle

from orchestrator import snapshots, storage


def test_whole_and_cut_state_files_are_told_apart():
    state = json.dumps({"trial_data": [["a" * 50, "b"]]}).encode()
    assert snapshots.is_whole("experiment_state-x.json", state)
    assert not snapshots.is_whole("experiment_state-x.json", state[:-7])
    assert not snapshots.is_whole("experiment_state-x.json", b"")
    pickled = pickle.dumps({"searcher": list(range(100))}, protocol=5)  # Ray names some pickles *.json
    assert snapshots.is_whole("basic-variant-state-x.json", pickled)
    assert not snapshots.is_whole("basic-variant-state-x.json", pickled[:-3])


def test_a_cut_state_file_is_repaired_from_the_last_good_copy(tmp_path):
    folder = storage.resolve(str(tmp_path / "search-1"))
    (tmp_path / "search-1").mkdir()
    good = json.dumps({"trials": [1, 2, 3]}).encode()
    (tmp_path / "search-1" / "experiment_state-1.json").write_bytes(good)
    (tmp_path / "search-1" / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1}))
    backup = snapshots.StateBackup(folder)
    assert backup.backup() == 2 and backup.has_experiment_state()
    assert backup.backup() == 0  # unchanged: nothing copied again

    (tmp_path / "search-1" / "experiment_state-1.json").write_bytes(good[:9])  # cut by a full disk
    assert backup.backup() == 0  # a damaged file never replaces the good copy
    assert snapshots.repair(folder) == ["experiment_state-1.json"]
    assert (tmp_path / "search-1" / "experiment_state-1.json").read_bytes() == good
    assert snapshots.repair(folder) == []  # nothing left to repair
    (tmp_path / "search-1" / "tuner.pkl").unlink()  # gone altogether
    assert snapshots.repair(folder) == ["tuner.pkl"]
