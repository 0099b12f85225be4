"""What every ``normlab`` command shares: the consoles, the two failures (exit 2 for bad input,
exit 1 for a failed trial), the options several commands take (each written once), the command
group ``main`` and the program's entry point ``entry``, and how a search command ends (``leave``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from orchestrator.tracking.target import TrackingTarget


def _console(stderr: bool) -> Console:
    """Rich console; when output is not a terminal, wide enough for results tables."""
    probe = Console(stderr=stderr)
    return Console(stderr=stderr, highlight=False, width=None if probe.is_terminal else 200)


console = _console(stderr=True)
out = _console(stderr=False)


MAX_MESSAGE_LINES = 18


def _bounded(message: str) -> str:
    """At most ``MAX_MESSAGE_LINES`` lines of at most 500 characters (messages quote user input)."""
    lines = [line if len(line) <= 500 else line[:497] + "..." for line in message.splitlines()]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = [*lines[: MAX_MESSAGE_LINES - 1], f"... and {len(lines) - MAX_MESSAGE_LINES + 1} more lines"]
    return "\n".join(lines)


class UsageFailure(click.ClickException):
    """A user error: printed without a traceback, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        console.print(f"[bold red]error:[/] {escape(_bounded(self.message))}", soft_wrap=True)


class TrialFailure(click.ClickException):
    """A trial that started and failed (NaN loss, missing files, ...): the reason, exit code 1."""

    def show(self, file: Any = None) -> None:
        console.print(f"[bold red]trial failed:[/] {escape(_bounded(self.message))}", soft_wrap=True)


# ------------------------------------------------------------------ what several commands take
# Each option is written once, with its default; a command's text says what the option means
# there, and ``{default}`` in it stands for the default.

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_TRACKING = "$MLFLOW_TRACKING_URI, else normlab_runs/mlflow.db"  # orchestrator.tracking.target
DEFAULT_STORAGE = "normlab_runs/ray_results"  # orchestrator.state.storage.DEFAULT_ROOT
LOCAL_RAY = "a local Ray on 127.0.0.1"  # orchestrator.running.rayenv, search._prepare_ray

overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
profile_option = click.option(
    "--profile",
    metavar="NAME",
    help="A profile of the search file (its profiles: section), merged over the file before the KEY=VALUE "
    "overrides; the built-in paper spaces have `paper`, the papers' own scale.",
)
num_cpus_option = click.option("--num-cpus", type=click.IntRange(min=1), help="CPUs of the local Ray (default: all).")


def tracking_uri_option(text: str) -> Callable[[F], F]:
    """``--tracking-uri``: the MLflow store (``orchestrator.tracking.target.resolve_tracking``)."""
    return click.option("--tracking-uri", help=text.format(default=DEFAULT_TRACKING))


def storage_path_option(text: str) -> Callable[[F], F]:
    """``--storage-path``: where searches are stored, a folder or an s3:// URI."""
    return click.option("--storage-path", help=text.format(default=DEFAULT_STORAGE))


def address_option(text: str) -> Callable[[F], F]:
    """``--address``: the Ray cluster to join (``_prepare_ray``)."""
    return click.option("--address", help=text.format(default=LOCAL_RAY))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="normlab")
def main() -> None:
    """normlab: adversarial robustness of normalization layers, as Ray Tune searches."""
    from orchestrator.running.rayenv import prepare_environment

    prepare_environment()  # before anything imports ray or mlflow


def reachable_tracking(tracking_uri: str | None, timeout: float | None = None) -> TrackingTarget:
    """The tracking target of ``--tracking-uri`` (or its default), checked before any work starts
    (within ``timeout`` seconds; default: ``check_reachable``'s)."""
    from orchestrator.tracking.search_run import TrackingUnreachable, check_reachable
    from orchestrator.tracking.target import resolve_tracking

    target = resolve_tracking(tracking_uri)
    try:
        if timeout is None:
            check_reachable(target)
        else:
            check_reachable(target, timeout=timeout)
    except TrackingUnreachable as exc:
        raise UsageFailure(str(exc)) from exc
    return target


_EXIT_AT_ONCE = False  # set by ``entry``: this process is the `normlab` program, not a caller's


def leave(code: int) -> NoReturn:
    """End a command that ran a search, with exit status ``code``.

    As the `normlab` program (``entry``): output and logs flushed, the connection to a
    cluster's Ray closed or a local Ray it started killed, then the process ends at once.
    Python's own teardown after a search (torch's, Ray's core worker's and gRPC's native
    destructors) has nothing left to do and took 2-7 s here, one of the larger costs of a
    small search. Everything the search wrote is already closed: MLflow
    calls are synchronous, files are written whole. Called in-process (tests, a caller's
    script): ``SystemExit(code)``, so the caller carries on.
    """
    if not _EXIT_AT_ONCE:
        raise SystemExit(code)
    import logging

    import ray

    from orchestrator.running.connect import end_local_ray, started_local_ray

    # A local Ray this process started is killed whole (``end_local_ray``: Ray's graceful
    # shutdown took 1.1-1.4 s). A cluster's Ray is left the proper way, so the cluster sees
    # this driver's job end.
    if started_local_ray():
        end_local_ray()
    elif ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:
    """The `normlab` program (console script, ``python -m orchestrator.cli``): ``main``, with a
    search command ending the process at once when it is done (``leave``)."""
    global _EXIT_AT_ONCE
    _EXIT_AT_ONCE = True
    main()
