"""normlab's last good copy of Ray Tune's experiment state, and the repair that uses it."""

from __future__ import annotations

import json
import pickle

from orchestrator.state import snapshots, storage


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


def test_a_pickle_cut_right_after_a_dot_in_its_data_is_not_whole():
    pickled = pickle.dumps({"path": "/x/checkpoint.pt", "lr": 0.1, "rest": list(range(50))}, protocol=5)
    cut = pickled[: pickled.index(b".pt") + 1]  # ends with the byte STOP is, inside a string
    assert cut.endswith(b".") and not snapshots.is_whole("searcher-state-x.pkl", cut)


def test_a_damaged_experiment_state_with_no_good_copy_is_set_aside(tmp_path):
    """A resume on a still-full disk: its new experiment state was cut and could not be backed up;
    moved aside, Ray restores the earlier session's whole state instead."""
    (tmp_path / "s").mkdir()
    folder = storage.resolve(str(tmp_path / "s"))
    older = json.dumps({"trials": [1]}).encode()
    (tmp_path / "s" / "experiment_state-2026-01-01.json").write_bytes(older)
    snapshots.StateBackup(folder).backup()
    (tmp_path / "s" / "experiment_state-2026-01-02.json").write_bytes(b'{"tri')  # the newer session's, cut
    assert snapshots.repair(folder) == ["experiment_state-2026-01-02.json"]
    assert sorted(p.name for p in (tmp_path / "s").glob("experiment_state-*")) == [
        "experiment_state-2026-01-01.json",
        "experiment_state-2026-01-02.json.damaged",
    ]


def test_a_state_naming_code_this_version_lacks_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    import pytest

    (tmp_path / "oldnormlab.py").write_text(
        "class CloseRunsCallback:\n    def __init__(self):\n        self.tracker = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import oldnormlab

    search = tmp_path / "search-1"
    search.mkdir()
    folder = storage.resolve(str(search))
    snapshots.check_loadable(folder)  # no tuner.pkl: nothing to say
    (search / "tuner.pkl").write_bytes(pickle.dumps({"callbacks": [oldnormlab.CloseRunsCallback()]}))
    snapshots.check_loadable(folder)  # loadable while the class exists
    del oldnormlab.CloseRunsCallback  # the class an earlier normlab pickled is gone
    with pytest.raises(snapshots.IncompatibleStateError, match="started by an earlier normlab") as info:
        snapshots.check_loadable(folder)
    assert "CloseRunsCallback" in str(info.value) and "submit the search file again" in str(info.value)
    sys.modules.pop("oldnormlab")
    (tmp_path / "oldnormlab.py").unlink()  # the module too
    with pytest.raises(snapshots.IncompatibleStateError, match="oldnormlab"):
        snapshots.check_loadable(folder)
