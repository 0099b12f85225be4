"""The Python environment a trial or search ran with, and whether it is the locked one.

``make setup`` installs ``requirements/lock.txt`` (every package at the version the test
suite passed with, with hashes) and copies it to ``<venv>/normlab-lock.txt``: that copy
says which lock *this* environment was installed from, on whichever node it lives.
``environment()`` reads it, with the installed versions, and ``environment_tags()`` makes run tags of it: the lock's hash (or ``none``), whether the
installed packages still match it, and the versions of the packages results depend on.
Reading versions uses ``importlib.metadata`` only: nothing here imports torch, Ray or MLflow.

Run as a module, it is the check ``make setup`` ends with::

    python -m trainables.environment check requirements/lock.txt   # exit 1 on any difference
    python -m trainables.environment diff requirements/lock.txt    # what differs, exit 0
"""

from __future__ import annotations

import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

INSTALLED_LOCK = "normlab-lock.txt"  # in sys.prefix: the lock this environment was installed from
KEY_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "optuna", "torchattacks")
SELF = "normlab"  # the project itself is installed editable, not from the lock
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name: ``PyYAML`` and ``pyyaml``, ``ray[tune]``'s ``ray`` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` pin in a pip requirements lock."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """``name -> version`` of every distribution installed in this interpreter's environment.

    Its site-packages only, not all of ``sys.path``: Ray puts its vendored copies of psutil and
    colorama on the path once imported, and those are not part of the install."""
    found: dict[str, str] = {}
    site = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    for dist in metadata.distributions(path=site):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


@dataclass(frozen=True)
class LockDiff:
    """How the installed packages differ from a lock."""

    changed: dict[str, tuple[str, str]]  # name -> (locked, installed)
    missing: dict[str, str]  # locked, not installed
    extra: dict[str, str]  # installed, not in the lock

    @property
    def exact(self) -> bool:
        return not (self.changed or self.missing or self.extra)

    def lines(self) -> list[str]:
        out = [f"{n}: locked {a}, installed {b}" for n, (a, b) in sorted(self.changed.items())]
        out += [f"{n}: locked {v}, not installed" for n, v in sorted(self.missing.items())]
        out += [f"{n}: installed {v}, not in the lock" for n, v in sorted(self.extra.items())]
        return out

    def summary(self) -> str:
        if self.exact:
            return "exact"
        parts = [
            f"{len(d)} {what}"
            for d, what in ((self.changed, "changed"), (self.missing, "missing"), (self.extra, "extra"))
            if d
        ]
        return ", ".join(parts) + ": " + "; ".join(self.lines())


def compare(lock: dict[str, str], present: dict[str, str]) -> LockDiff:
    """The installed packages ``present`` against the pins of ``lock`` (normlab itself ignored)."""
    present = {n: v for n, v in present.items() if n != SELF}
    return LockDiff(
        changed={n: (v, present[n]) for n, v in lock.items() if n in present and present[n] != v},
        missing={n: v for n, v in lock.items() if n not in present},
        extra={n: v for n, v in present.items() if n not in lock},
    )


def lock_digest(path: Path) -> str:
    """The lock's identity in run tags: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """This process's environment: lock hash (or ``none``), its match, Python and key versions."""
    lock = Path(sys.prefix) / INSTALLED_LOCK
    present = installed()
    env = {"python": ".".join(map(str, sys.version_info[:3]))}
    env.update({name: present.get(name, "not installed") for name in KEY_PACKAGES})
    if lock.is_file():
        env["lock"] = lock_digest(lock)
        env["lock_match"] = compare(read_lock(lock), present).summary()[:4000]
    else:
        env["lock"] = "none"
        env["lock_match"] = "not installed from a lock"
    return env


def environment_tags(prefix: str = "normlab.env.") -> dict[str, str]:
    """``environment()`` as run tags (``normlab.env.lock``, ``normlab.env.torch``, ...)."""
    return {prefix + key: value for key, value in environment().items()}


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "diff"):
        print("usage: python -m trainables.environment check|diff LOCKFILE", file=sys.stderr)
        return 2
    command, path = argv[0], Path(argv[1])
    diff = compare(read_lock(path), installed())
    if diff.exact:
        print(f"environment matches {path} exactly ({len(read_lock(path))} packages)")
        return 0
    print(f"environment differs from {path}:")
    for line in diff.lines():
        print(f"  {line}")
    return 1 if command == "check" else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
