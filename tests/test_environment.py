"""The installed environment against the lock: the parser, the comparison, and this venv.

``make setup`` installs requirements/lock.txt with hashes and no resolver, checks the
result with ``python -m trainables.environment check``, and copies the lock into the venv;
every run then carries the lock's hash and the key versions (test_search_local.py checks
the tags on a real search's runs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainables import environment as envmod
from trainables.environment import compare, environment, lock_digest, read_lock

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"


def test_the_lock_pins_every_package_with_hashes_and_the_pairs_that_must_go_together():
    pins = read_lock(LOCK)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"  # the pair that imports together
    assert "torchattacks" in pins and "optuna" in pins and "ray" in pins and "mlflow" in pins
    assert "pip" in pins and "setuptools" in pins  # the installer and the build backend are locked too
    text = LOCK.read_text()
    # every pin is followed by at least one hash, so pip runs in --require-hashes mode
    blocks = [b for b in text.split("\n") if "==" in b and not b.lstrip().startswith("#")]
    assert len(blocks) == len(pins)
    assert text.count("--hash=sha256:") >= len(pins)


def test_read_lock_parses_pins_extras_and_names_as_pip_does(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# c\nPyYAML==6.0.3 \\\n    --hash=sha256:ab\nray[tune]==2.60.0 \\\n    # via x\nzipp==3.1 ; python_version >= '3'\n"
    )
    assert read_lock(lock) == {"pyyaml": "6.0.3", "ray": "2.60.0", "zipp": "3.1"}


def test_compare_names_every_changed_missing_and_extra_package():
    diff = compare(
        {"optuna": "5.0.0", "torch": "2.14.1", "gone": "1.0"},
        {"optuna": "5.1.0", "torch": "2.14.1", "surprise": "0.1", "normlab": "0.1.0"},
    )
    assert not diff.exact
    assert diff.changed == {"optuna": ("5.0.0", "5.1.0")} and diff.missing == {"gone": "1.0"}
    assert diff.extra == {"surprise": "0.1"}  # normlab itself is never extra
    assert "optuna: locked 5.0.0, installed 5.1.0" in diff.summary()
    assert compare({"a": "1"}, {"a": "1", "normlab": "0"}).summary() == "exact"


def test_this_environment_is_the_committed_lock_or_says_it_is_not_locked():
    """In ``make setup``'s .venv: installed from requirements/lock.txt, and nothing drifted since.
    In ``make test-latest``'s .venv-latest (no lock by design): the runs say so."""
    env = environment()
    marker = Path(sys.prefix) / envmod.INSTALLED_LOCK
    if marker.exists():
        assert marker.read_bytes() == LOCK.read_bytes(), "the venv was set up from another lock: run make setup"
        assert env["lock"] == lock_digest(LOCK)
        assert env["lock_match"] == "exact", env["lock_match"]
    else:
        assert env["lock"] == "none" and env["lock_match"] == "not installed from a lock"
    for name in ("torch", "ray", "mlflow", "optuna", "torchattacks"):
        assert env[name] != "not installed"


@pytest.mark.parametrize("command,code", [("check", 1), ("diff", 0)])
def test_the_check_fails_on_a_lock_this_environment_does_not_match(tmp_path, command, code):
    lock = tmp_path / "lock.txt"
    lock.write_text("optuna==0.0.1 \\\n    --hash=sha256:00\n")
    proc = subprocess.run(
        [sys.executable, "-m", "trainables.environment", command, str(lock)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == code
    assert "optuna: locked 0.0.1, installed" in proc.stdout
    assert "not in the lock" in proc.stdout  # torch and the rest are extras against this lock
