"""``normlab validate | submit | resume``: a search file checked, a search run on Ray Tune with the
driver here, a stopped or failed search continued (``--job`` hands the driver to the cluster:
``orchestrator.cli.jobs``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.markup import escape

from orchestrator.cli.common import (
    TrialFailure,
    UsageFailure,
    address_option,
    console,
    leave,
    main,
    num_cpus_option,
    out,
    overrides_argument,
    profile_option,
    reachable_tracking,
    storage_path_option,
    tracking_uri_option,
)
from orchestrator.cli.jobs import job_options, refuse_job_options, resume_search_job, submit_search_job

if TYPE_CHECKING:
    from orchestrator.tracking.target import TrackingTarget


def _load_space(space: str, overrides: tuple[str, ...], profile: str | None = None) -> Any:
    from orchestrator.searchfile.load import UnknownProfile, load_space
    from orchestrator.searchfile.space import SpaceError

    try:
        return load_space(space, overrides, profile)
    except UnknownProfile as exc:
        raise UsageFailure(f"unknown profile\n{exc}") from exc
    except SpaceError as exc:
        raise UsageFailure(f"invalid search space\n{exc}") from exc


class _InBackground:
    """``fn(*args)`` in a daemon thread; ``result()`` waits for it and returns or raises what it
    did. A daemon, so that Ctrl-C while it waits (on a tracking server that does not answer)
    ends the command at once instead of at the end of its wait."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn, *args), name="normlab-setup", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._outcome["error"] = exc

    def result(self) -> Any:
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


def _driver_and_tracking(tracking_uri: str | None) -> TrackingTarget:
    """Import the search driver and check (or create) the tracking store: ``submit``'s set-up
    that runs while Ray starts."""
    from trainables import profiling

    with profiling.span("driver.imports"):
        import orchestrator.running.driver  # noqa: F401 - imported here, used by the caller
    with profiling.span("driver.tracking"):
        return reachable_tracking(tracking_uri)


def _prepare_ray(address: str | None) -> None:
    """Ray's environment before ray is imported: a loopback-only local Ray, or the
    authentication mode of the cluster at ``address`` (probed), or a clear error."""
    from orchestrator.running.rayenv import prepare_environment

    joining = address or os.environ.get("RAY_ADDRESS")
    try:
        prepare_environment(local_ray=not joining, address=joining)
    except ConnectionError as exc:  # unreachable head, or an authentication mismatch
        raise UsageFailure(str(exc)) from exc


@contextmanager
def _search_errors(*also_usage: type[Exception]) -> Iterator[None]:
    """Running or resuming a search (after ``_prepare_ray``): its storage or a stage's inputs
    failing is a TrialFailure (exit 1); storage, tracking or a sampler that cannot be used or
    saved, a study database that cannot be opened, and ``also_usage``, are a UsageFailure (exit 2)."""
    from orchestrator.running.driver import SearchStorageError
    from orchestrator.running.stage_inputs import StageError
    from orchestrator.state.storage import StorageError
    from orchestrator.studies.study import SearcherStateError, StudyStorageError
    from orchestrator.tracking.search_run import TrackingUnreachable

    try:
        yield
    except (SearchStorageError, StageError) as exc:
        raise TrialFailure(str(exc)) from exc
    except (StorageError, TrackingUnreachable, SearcherStateError, StudyStorageError, *also_usage) as exc:
        raise UsageFailure(str(exc)) from exc


@contextmanager
def _stopped() -> Iterator[None]:
    """A search whose driver was asked to stop (Ctrl-C; SIGTERM, e.g. `normlab stop`): how to
    continue it, exit 128 + the signal's number (130, 143) as a shell reports a stopped command."""
    from orchestrator.running.driver import SearchStopped

    try:
        yield
    except SearchStopped as exc:
        import shlex

        console.print(
            f"search stopped; `normlab resume {escape(shlex.quote(exc.experiment_path))}` continues it", soft_wrap=True
        )
        leave(128 + exc.signum)


def _print_outcome(outcome: Any, *, resumed: bool) -> NoReturn:
    """A finished search (submit, resume): its results table and MLflow UI link; with failed
    trials, how many and (after submit) the command that continues them, then exit code 1."""
    import shlex

    out.print(outcome.table)
    console.print(f"MLflow UI: {outcome.ui_url}", soft_wrap=True, markup=False)
    if not outcome.failed:
        leave(0)
    if resumed:
        console.print(f"[red]{outcome.failed} trial(s) failed again[/]; see the errors above.")
    else:
        console.print(
            f"[red]{outcome.failed} trial(s) failed[/]; see the errors above, then "
            f"`normlab resume {escape(shlex.quote(outcome.experiment_path))}` to continue them."
        )
    leave(1)


def _space_summary(path: Path, spec: Any, profile: str | None) -> str:
    """``FILE[ with profile NAME]: ok: search ...``: what ``validate`` found."""
    s = spec.search
    stages = f", stages {', '.join(spec.stages)}" if spec.stages else ""
    return (
        f"{path}{f' with profile {profile}' if profile else ''}: ok: search {spec.name!r}, {spec.trial_count()} "
        f"trial(s){stages}, algorithm {s.algorithm}, scheduler {s.scheduler.type}, metric {s.describe()}, "
        f"{spec.resources.cpu:g} CPU / {spec.resources.gpu:g} GPU per trial"
    )


@main.command()
@click.argument("space")
@overrides_argument
@profile_option
def validate(space: str, overrides: tuple[str, ...], profile: str | None) -> None:
    """Check a search space (a built-in name or a YAML file) without running anything.

    Without --profile, the file and then every profile it defines (each with the overrides),
    one line each; with --profile NAME, that profile only. Every problem is listed with the
    file, the profile, the key path and what is allowed; exit code 2.
    """
    if profile is not None:
        spec, path = _load_space(space, overrides, profile)
        out.print(escape(_space_summary(path, spec, profile)), soft_wrap=True)
        return
    from orchestrator.searchfile.load import load_every_profile
    from orchestrator.searchfile.space import SpaceError

    try:
        path, results = load_every_profile(space, overrides)
    except SpaceError as exc:
        raise UsageFailure(f"invalid search space\n{exc}") from exc
    failed = []
    for name, result in results:
        if isinstance(result, SpaceError):
            failed.append(str(result))
        else:
            out.print(escape(_space_summary(path, result, name)), soft_wrap=True)  # one line each
    if failed:
        raise UsageFailure("invalid search space\n" + "\n".join(failed))


@main.command()
@click.argument("space")
@overrides_argument
@address_option(
    "Ray cluster to run on (host:port of a head, or ray://host:10001; with --job the dashboard's "
    "http://HEAD:8265). Default: {default}."
)
@tracking_uri_option("MLflow tracking URI every node can reach. Default: {default}.")
@storage_path_option(
    "Ray Tune results and checkpoints: a shared folder or s3:// for several nodes. Default: {default}."
)
@num_cpus_option
@profile_option
@job_options
def submit(
    space: str,
    overrides: tuple[str, ...],
    address: str | None,
    tracking_uri: str | None,
    storage_path: str | None,
    num_cpus: int | None,
    profile: str | None,
    job: bool,
    working_dir: Path | None,
    entrypoint_num_cpus: float | None,
    entrypoint_resources: str | None,
) -> None:
    """Run a search: every trial on Ray Tune, every trial in MLflow.

    \b
    Examples:
      normlab submit quickstart
      normlab submit quickstart epochs=2 num_samples=3
      normlab submit robustnorm_paper --profile paper data_dir=/data/cifar10 --address head:6379
      normlab submit my_space.yaml --address head:6379 --tracking-uri http://mlflow:5000 \\
                     --storage-path s3://bucket/normlab
      normlab submit my_space.yaml --job --address http://head:8265 --tracking-uri http://mlflow:5000 \\
                     --storage-path /shared/normlab
    """
    from trainables import profiling

    profiling.record("driver.start", profiling.process_started())  # process start to here: imports
    given = {
        "working_dir": working_dir,
        "entrypoint_num_cpus": entrypoint_num_cpus,
        "entrypoint_resources": entrypoint_resources,
    }
    refuse_job_options(job, **given, address=address)
    if job and num_cpus is not None:
        raise UsageFailure("--num-cpus sizes a local Ray; a Ray job runs on the cluster (see --entrypoint-num-cpus)")
    spec, path = _load_space(space, overrides, profile)
    if job:
        submit_search_job(space, path, spec.name, overrides, profile, address, tracking_uri, storage_path, given)
        return
    _prepare_ray(address)
    # While Ray starts (seconds, mostly spent waiting for its processes), a thread imports
    # the driver and sets up tracking (creating a new MLflow store takes seconds too): the
    # trials' workers, which Ray starts only once the Tuner asks for them, start that much
    # sooner. A tracking store that cannot be used still stops the search before any trial.
    from orchestrator.running.connect import init_ray

    tracking = _InBackground(_driver_and_tracking, tracking_uri)
    try:
        with profiling.span("driver.ray_start"):
            where = init_ray(address, num_cpus=num_cpus, datasets=tuple(map(str, spec.values_of("dataset"))))
    except ConnectionError as exc:  # a cluster that went away since _prepare_ray probed it
        raise UsageFailure(str(exc)) from exc
    target = tracking.result()
    from orchestrator.running.driver import run_search

    if address and target.is_local_file_store:
        console.print(
            f"[yellow]warning:[/] tracking store {target.uri} is a local file: trials on other nodes "
            "cannot write to it; pass --tracking-uri http://... of an MLflow server"
        )
    with _search_errors(), _stopped():
        outcome = run_search(spec, path, target, where=where, storage_path=storage_path, console=console)
    _print_outcome(outcome, resumed=False)


def _check_resume_arguments(search: str, storage_path: str | None) -> None:
    """Refuse, before Ray starts, a SEARCH path or a local --storage-path that is no folder."""
    looks_like_path = search.startswith((".", "~")) or "/" in search or os.sep in search
    checks = (
        (
            "SEARCH",
            search if looks_like_path else None,
            "give the search's folder (printed by `normlab submit`) or its name",
        ),
        ("--storage-path", storage_path, "give the folder searches were stored in, or an s3:// URI"),
    )
    for label, value, hint in checks:
        if not value or "://" in value:
            continue
        try:
            path = Path(value).expanduser()
            exists, is_dir = path.exists(), path.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:
            raise UsageFailure(f"{label} {value}: not a usable path ({exc})") from exc
        if not exists:
            raise UsageFailure(f"{label} {value}: no such folder; {hint}")
        if not is_dir:
            raise UsageFailure(f"{label} {value}: a file, not a folder; {hint}")


@main.command()
@click.argument("search")
@address_option("Ray cluster to resume on (with --job the dashboard's http://HEAD:8265; default: {default}).")
@storage_path_option("Where the search was stored, when SEARCH is a name (default: {default}; s3://... too).")
@num_cpus_option
@job_options
def resume(
    search: str,
    address: str | None,
    storage_path: str | None,
    num_cpus: int | None,
    job: bool,
    working_dir: Path | None,
    entrypoint_num_cpus: float | None,
    entrypoint_resources: str | None,
) -> None:
    """Continue a search that was interrupted or had failed trials.

    SEARCH is the search's folder (printed by submit; a path or an s3://... URI) or its
    name (the newest such search in the storage path). Unfinished and failed trials
    continue from their last checkpoints; each keeps writing to its own MLflow run.
    With --job the resumed driver runs as a Ray job on the cluster.
    """
    given = {
        "working_dir": working_dir,
        "entrypoint_num_cpus": entrypoint_num_cpus,
        "entrypoint_resources": entrypoint_resources,
    }
    refuse_job_options(job, **given, address=address)
    if job:
        resume_search_job(search, address, storage_path, num_cpus, given)
        return
    _check_resume_arguments(search, storage_path)
    _prepare_ray(address)
    from orchestrator.running.driver import resume_search
    from orchestrator.state.records import find_experiment

    with _search_errors(LookupError, ConnectionError), _stopped():  # no such search; an unreachable cluster
        folder = find_experiment(search, storage_path)
        outcome = resume_search(folder, address=address, num_cpus=num_cpus, console=console)
    _print_outcome(outcome, resumed=True)
