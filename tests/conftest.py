"""Shared test helpers: run the real ``normlab`` command, free ports, loopback-only Ray, an MLflow
server, an S3 server (``s3``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray binds to and advertises 127.0.0.1 only with this (docs/design.md, known traps).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves os.environ as it found it: a command run in-process (CliRunner) sets Ray's
    and MLflow's variables for this process (``prepare_environment``: RAY_AUTH_MODE, ...), which
    would change what later tests in the same process (a pytest-xdist worker) start."""
    saved = os.environ.copy()
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def normlab_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "RAY_ADDRESS"))}
    env.update(extra)
    return env


def run_normlab(*args: str, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``normlab ARGS`` as a subprocess of this interpreter, in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=normlab_env(**env),
    )


_MARKDOWN_CELL_SEP = re.compile(r"(?<!\\)\|")  # a `|` that is not escaped
_MARKDOWN_ALIGN = re.compile(r"(:?)-+(:?)")


def markdown_table(text: str) -> tuple[list[str], list[str], list[list[str]]]:
    """A markdown (pipe) table: its header cells, each column's alignment (``left``, ``right``,
    ``center`` or ``""``) and its rows of cells, stripped of padding. Fails unless every line is
    ``| ... |`` with the header's number of cells and the second line is the alignment row."""
    lines = text.rstrip("\n").split("\n")
    assert len(lines) >= 2, f"not a markdown table: {text!r}"
    cells = []
    for line in lines:
        assert line.startswith("|") and line.endswith("|") and not line.endswith("\\|"), f"not a table row: {line!r}"
        cells.append([c.strip() for c in _MARKDOWN_CELL_SEP.split(line[1:-1])])
    header, separator, rows = cells[0], cells[1], cells[2:]
    assert all(len(row) == len(header) for row in [separator, *rows]), f"ragged table: {text!r}"
    aligns = []
    for segment in separator:
        match = _MARKDOWN_ALIGN.fullmatch(segment)
        assert match, f"not an alignment row: {lines[1]!r}"
        left, right = bool(match.group(1)), bool(match.group(2))
        aligns.append({(True, False): "left", (False, True): "right", (True, True): "center"}.get((left, right), ""))
    return header, aligns, rows


def start_submit(cwd: Path, space: str = "space.yaml") -> subprocess.Popen:
    """``normlab submit SPACE --num-cpus 2`` in ``cwd`` as a driver in its own process group (to
    SIGKILL whole), its stderr in ``cwd/submit.log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "submit", space, "--num-cpus", "2"],
        cwd=cwd,
        env=normlab_env(),
        stdout=subprocess.DEVNULL,
        stderr=(cwd / "submit.log").open("w"),
        start_new_session=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


BIN = Path(sys.executable).parent


def loopback_env(home: Path) -> dict[str, str]:
    """Everything on 127.0.0.1; Ray's token in a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING", "RAY_AUTH"))}
    env.update(
        HOME=str(home),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
        MLFLOW_DISABLE_TELEMETRY="true",
        # the head's dashboard process probes cloud-metadata addresses: send that to a dead port on loopback
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        no_proxy="127.0.0.1,localhost,::1",
    )
    return env


def start_token_head(env: dict[str, str], log: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """A real `ray start --head --block` on 127.0.0.1 with token authentication (a token generated
    first in ``env``'s HOME, as on a real cluster), 2 CPUs, in its own process group; ``args``
    are further `ray start` options. Returns the process and its GCS port."""
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60
    )
    port = free_port()
    # the node's agents on free ports too: with Ray's fixed defaults (52365, ...) a second head on this
    # machine (another test file, in another pytest-xdist worker) has no job agent ("No available agent")
    agents = [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--num-cpus=2",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        [*command, *agents, *args],
        env={**env, "RAY_AUTH_MODE": "token"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped whole, nothing else touched
    )
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and every process it started (they share its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)  # a `ray start --head --block` group can take 30 s and more to go by itself
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a SQLite store in ``root`` (or the database at
    ``backend``, e.g. PostgreSQL); stop and start it at will."""

    def __init__(
        self, root: Path, port: int | None = None, env: dict[str, str] | None = None, backend: str | None = None
    ) -> None:
        self.root, self.port, self.env = root, port or free_port(), env
        self.backend = backend or f"sqlite:///{root / 'server.db'}"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> MlflowServer:
        import requests

        self.starts += 1
        log = self.root / f"mlflow-{self.starts}.log"
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                self.backend,
                "--artifacts-destination",
                str(self.root / "server-artifacts"),
            ],
            env=self.env or normlab_env(),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: requests.get(f"{self.uri}/health", timeout=2).status_code == 200,
            120,
            "mlflow server",
            self.proc,
            log,
        )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 (tests/s3server.py), one per test module that asks for it."""
    from s3server import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
