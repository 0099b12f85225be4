"""The ``normlab`` command line: trial | submit | resume | status | logs | stop | report | ui | validate.

Every command reads flat ``KEY=VALUE`` overrides with the same names a search-space
file and MLflow's params use; ``submit`` and ``validate`` also take ``--profile NAME``, a
profile of the search file, merged before the overrides. Bad input is reported (file,
field, what is allowed) with exit code 2 before any work starts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from pydantic import ValidationError
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


class KnobsCommand(click.Command):
    """A command whose help ends with every TrialConfig knob and its default (built lazily)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from trainables.config import TrialConfig

        rows = []
        for name, field in TrialConfig.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = ",".join(str(v) for v in default) or "[]"
            rows.append((f"{name}={default}", field.description or ""))
        with formatter.section("Trial knobs (KEY=VALUE, shown with their defaults)"):
            formatter.write_dl(rows)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A ``--config`` file, read with the bounded YAML reader; any refusal is a UsageFailure."""
    from trainables.safe_yaml import YamlRefused, load_yaml_file

    try:
        data = load_yaml_file(path)
    except YamlRefused as exc:
        raise UsageFailure(f"cannot read trial configuration\n{exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UsageFailure(f"{path}: expected a mapping of trial knobs, got {type(data).__name__}")
    return data


def build_trial_config(config_file: Path | None, overrides: tuple[str, ...]) -> Any:
    """TrialConfig from an optional YAML file plus ``KEY=VALUE`` overrides, or a UsageFailure."""
    from trainables.config import TrialConfig, format_validation_error, parse_overrides

    values: dict[str, Any] = _read_yaml_mapping(config_file) if config_file else {}
    try:
        values.update(parse_overrides(list(overrides)))
    except ValueError as exc:
        raise UsageFailure(f"invalid trial configuration\ncommand line: {exc}") from exc
    source = str(config_file) if config_file else "command line"
    try:
        return TrialConfig.model_validate(values)
    except ValidationError as exc:
        raise UsageFailure("invalid trial configuration\n" + format_validation_error(exc, source)) from exc


def _check_writable_folder(folder: Path, what: str) -> None:
    """Make ``folder`` and write and remove a file in it, or a UsageFailure naming ``what`` (the
    option and its value): a folder that cannot be written (a file in the way, no permission, a
    read-only disk) is refused before any work starts, not after the first epoch."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".normlab-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        if isinstance(exc, FileExistsError):
            reason = "a file is in the way"
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageFailure(f"{what}: cannot write in the folder {folder} ({reason})") from exc


# ------------------------------------------------------------------ what several commands take
# Each option is written once, with its default; a command's text says what the option means
# there, and ``{default}`` in it stands for the default.

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_TRACKING = "$MLFLOW_TRACKING_URI, else normlab_runs/mlflow.db"  # orchestrator.tracking.target
DEFAULT_STORAGE = "normlab_runs/ray_results"  # orchestrator.state.storage.DEFAULT_ROOT
LOCAL_RAY = "a local Ray on 127.0.0.1"  # orchestrator.running.rayenv, _prepare_ray

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


def job_options(f: F) -> F:
    """``--job`` and what a Ray job takes (``orchestrator.running.jobs``): submit and resume."""
    for option in reversed(
        (
            click.option(
                "--job",
                is_flag=True,
                help="Run the search's driver as a Ray job on the cluster (--address http://HEAD:8265, the dashboard) "
                "and return at once; `normlab logs NAME` follows it, `normlab stop NAME` stops it.",
            ),
            click.option(
                "--working-dir",
                type=click.Path(exists=True, file_okay=False, path_type=Path),
                help="With --job: a folder (a checkout) Ray uploads for the job; the driver runs in it. "
                "Default: normlab as installed on the cluster (a search file goes along by itself).",
            ),
            click.option(
                "--entrypoint-num-cpus",
                type=click.FloatRange(min=0),
                help="With --job: CPUs the driver takes; any value makes Ray place it on a node that has them "
                "(a head started with --num-cpus 0 then runs no driver).",
            ),
            click.option(
                "--entrypoint-resources",
                metavar="JSON",
                help="With --job: custom resources the driver needs, e.g. '{\"driver\": 1}'.",
            ),
        )
    ):
        f = option(f)
    return f


def _job_resources(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
        if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            return {str(k): float(v) for k, v in value.items()}
    except ValueError:
        pass
    raise UsageFailure(f"--entrypoint-resources {text}: give a JSON object of resource names and amounts")


def _no_job_options(job: bool, **given: Any) -> None:
    """Refuse --job's options without --job, and an http:// --address (the dashboard's) without it."""
    if job:
        return
    if any(v not in (None, False) for k, v in given.items() if k != "address"):
        names = ", ".join("--" + k.replace("_", "-") for k, v in given.items() if v not in (None, False))
        raise UsageFailure(f"{names}: only with --job")
    address = given.get("address") or ""
    if address.startswith(("http://", "https://")):
        raise UsageFailure(
            f"--address {address} is a Ray dashboard's address: add --job to run the search as a Ray job there, "
            "or give the head's HOST:6379 to run the driver here"
        )


def _job_client(address: str | None) -> Any:
    """The job server at ``address`` (or an http ``RAY_ADDRESS``), or a UsageFailure saying why not."""
    from orchestrator.running.jobs import JobError, connect

    try:
        return connect(address)
    except JobError as exc:
        raise UsageFailure(str(exc)) from exc


def _submit_job(request: Any, follow_hint: str) -> None:
    """Send ``request`` (a ``jobs.JobRequest``) and print the job id and how to follow it."""
    from orchestrator.running.jobs import JobError, left_behind
    from orchestrator.running.jobs import submit as submit_job

    client = _job_client(request.dashboard)
    kept = left_behind()
    if kept:
        console.print(
            f"[yellow]warning:[/] {', '.join(kept)} set here are not sent with the job (Ray stores and shows a "
            "job's environment): the driver uses the cluster's own (see docs/cluster.md, Ray's job API)",
            soft_wrap=True,
        )
    try:
        job_id = submit_job(client, request)
    except JobError as exc:
        raise UsageFailure(str(exc)) from exc
    address = request.dashboard
    out.print(job_id, soft_wrap=True, markup=False)
    console.print(f"Ray job {job_id} submitted to {address}: {request.entrypoint}", soft_wrap=True, markup=False)
    console.print(follow_hint, soft_wrap=True, markup=False)
    for line in (
        f"  follow it:   normlab logs {request.search} --address {address}",
        f"  its state:   normlab status {request.search} --address {address} --storage-path {request.storage_path}",
        f"  stop it:     normlab stop {request.search} --address {address}",
    ):
        console.print(line, soft_wrap=True, markup=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="normlab")
def main() -> None:
    """normlab: adversarial robustness of normalization layers, as Ray Tune searches."""
    from orchestrator.running.rayenv import prepare_environment

    prepare_environment()  # before anything imports ray or mlflow


@main.command(cls=KnobsCommand)
@overrides_argument
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file of trial knobs (overrides win).",
)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result (config, per-epoch history, final metrics) as JSON.",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save a checkpoint (last.pt) after every epoch here.",
)
@click.option("--resume/--no-resume", default=False, help="Continue from --checkpoint-dir/last.pt if it exists.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per epoch.")
def trial(
    overrides: tuple[str, ...],
    config_file: Path | None,
    json_out: Path | None,
    checkpoint_dir: Path | None,
    resume: bool,
    progress: bool,
) -> None:
    """Run one trial locally: no Ray, no MLflow.

    \b
    Example:
      normlab trial dataset=digits model=cnn norm=robustnorm norm_power=0.2 \\
                    regime=pgd_at epochs=10 eval_attacks=fgsm,pgd eval_eps=0.05,0.1 \\
                    --json-out result.json
    """
    from orchestrator.display.views import final_table, shift_table
    from trainables.checkpoints import load_checkpoint, save_checkpoint
    from trainables.trial import check_checkpoint, run_trial

    cfg = build_trial_config(config_file, overrides)
    if resume and not checkpoint_dir:
        raise UsageFailure("--resume needs --checkpoint-dir")
    if checkpoint_dir:
        _check_writable_folder(checkpoint_dir, f"--checkpoint-dir {checkpoint_dir}")
    if json_out:
        _check_writable_folder(json_out.parent, f"--json-out {json_out}")
    checkpoint = None
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    if resume and last and last.exists():
        try:
            checkpoint = load_checkpoint(last)
            check_checkpoint(cfg, checkpoint, str(last))
        except (OSError, ValueError) as exc:
            raise UsageFailure(f"cannot resume\n{exc}") from exc
        console.print(f"resuming from {last} (epoch {checkpoint['epoch']})")

    def on_epoch(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        if last:
            save_checkpoint(state, last)

    console.print(f"trial: {cfg.model} / {cfg.norm} / {cfg.regime} on {cfg.dataset}, {cfg.epochs} epochs")
    try:
        result = run_trial(
            cfg,
            on_epoch=on_epoch,
            checkpoint=checkpoint,
            progress=progress,
            log=lambda line: out.print(line, soft_wrap=True),
        )
    except (FloatingPointError, OSError, ValueError, RuntimeError) as exc:
        saved = f" (last good checkpoint: {last})" if last and last.exists() else ""
        raise TrialFailure(f"{type(exc).__name__}: {exc}{saved}") from exc
    out.print(final_table(result.final, cfg.eval_attacks, cfg.eval_eps, result.eval_batch_size))
    shifts = shift_table(result.final, cfg.primary_attack, cfg.primary_eps)  # None unless shift_diagnostic=true
    if shifts is not None:
        out.print(shifts)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        console.print(f"wrote {json_out}")


def _load_space(space: str, overrides: tuple[str, ...], profile: str | None = None) -> Any:
    from orchestrator.searchfile.load import UnknownProfile, load_space
    from orchestrator.searchfile.space import SpaceError

    try:
        return load_space(space, overrides, profile)
    except UnknownProfile as exc:
        raise UsageFailure(f"unknown profile\n{exc}") from exc
    except SpaceError as exc:
        raise UsageFailure(f"invalid search space\n{exc}") from exc


def _prepare_ray(address: str | None) -> None:
    """Ray's environment before ray is imported: a loopback-only local Ray, or the
    authentication mode of the cluster at ``address`` (probed), or a clear error."""
    from orchestrator.running.rayenv import prepare_environment

    joining = address or os.environ.get("RAY_ADDRESS")
    try:
        prepare_environment(local_ray=not joining, address=joining)
    except ConnectionError as exc:  # unreachable head, or an authentication mismatch
        raise UsageFailure(str(exc)) from exc


def _reachable_tracking(tracking_uri: str | None, timeout: float | None = None) -> TrackingTarget:
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


@contextmanager
def _search_errors(*also_usage: type[Exception]) -> Iterator[None]:
    """Running or resuming a search (after ``_prepare_ray``): its storage or a stage's inputs
    failing is a TrialFailure (exit 1); storage, tracking or a sampler that cannot be used or
    saved, and ``also_usage``, are a UsageFailure (exit 2)."""
    from orchestrator.running.driver import SearchStorageError
    from orchestrator.running.stage_inputs import StageError
    from orchestrator.state.storage import StorageError
    from orchestrator.studies.study import SearcherStateError
    from orchestrator.tracking.search_run import TrackingUnreachable

    try:
        yield
    except (SearchStorageError, StageError) as exc:
        raise TrialFailure(str(exc)) from exc
    except (StorageError, TrackingUnreachable, SearcherStateError, *also_usage) as exc:
        raise UsageFailure(str(exc)) from exc


@contextmanager
def _stopped() -> Iterator[None]:
    """A search whose driver was asked to stop (SIGTERM, e.g. `normlab stop`): how to continue it, exit 143."""
    from orchestrator.running.driver import SearchStopped

    try:
        yield
    except SearchStopped as exc:
        import shlex

        console.print(
            f"search stopped; `normlab resume {escape(shlex.quote(exc.experiment_path))}` continues it", soft_wrap=True
        )
        _leave(143)


def _print_outcome(outcome: Any, *, resumed: bool) -> NoReturn:
    """A finished search (submit, resume): its results table and MLflow UI link; with failed
    trials, how many and (after submit) the command that continues them, then exit code 1."""
    import shlex

    out.print(outcome.table)
    console.print(f"MLflow UI: {outcome.ui_url}", soft_wrap=True, markup=False)
    if not outcome.failed:
        _leave(0)
    if resumed:
        console.print(f"[red]{outcome.failed} trial(s) failed again[/]; see the errors above.")
    else:
        console.print(
            f"[red]{outcome.failed} trial(s) failed[/]; see the errors above, then "
            f"`normlab resume {escape(shlex.quote(outcome.experiment_path))}` to continue them."
        )
    _leave(1)


_EXIT_AT_ONCE = False  # set by ``entry``: this process is the `normlab` program, not a caller's


def _leave(code: int) -> NoReturn:
    """End a command that ran a search, with exit status ``code``.

    As the `normlab` program (``entry``): Ray shut down, output and logs flushed, then the
    process ends at once. Python's own teardown after a search (torch's, Ray's core worker's
    and gRPC's native destructors) has nothing left to do and took 2-7 s here, one of the
    larger costs of a small search. Everything the search wrote is already closed: MLflow
    calls are synchronous, files are written whole. Called in-process (tests, a caller's
    script): ``SystemExit(code)``, so the caller carries on.
    """
    if not _EXIT_AT_ONCE:
        raise SystemExit(code)
    import logging

    import ray

    if ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    _no_job_options(job, **given, address=address)
    if job and num_cpus is not None:
        raise UsageFailure("--num-cpus sizes a local Ray; a Ray job runs on the cluster (see --entrypoint-num-cpus)")
    spec, path = _load_space(space, overrides, profile)
    if job:
        _submit_search_job(space, path, spec.name, overrides, profile, address, tracking_uri, storage_path, given)
        return
    _prepare_ray(address)
    # Ray first: its workers import what trials need (warmup) while this process imports the
    # driver and sets up tracking. A tracking store that cannot be used still stops the
    # search before any trial starts.
    from orchestrator.running.connect import init_ray

    try:
        with profiling.span("driver.ray_start"):
            where = init_ray(address, num_cpus=num_cpus, datasets=tuple(map(str, spec.values_of("dataset"))))
    except ConnectionError as exc:  # a cluster that went away since _prepare_ray probed it
        raise UsageFailure(str(exc)) from exc
    with profiling.span("driver.imports"):
        from orchestrator.running.driver import run_search
    with profiling.span("driver.tracking"):
        target = _reachable_tracking(tracking_uri)
    if address and target.is_local_file_store:
        console.print(
            f"[yellow]warning:[/] tracking store {target.uri} is a local file: trials on other nodes "
            "cannot write to it; pass --tracking-uri http://... of an MLflow server"
        )
    with _search_errors(), _stopped():
        outcome = run_search(spec, path, target, where=where, storage_path=storage_path, console=console)
    _print_outcome(outcome, resumed=False)


def _submit_search_job(
    space: str,
    path: Path,
    name: str,
    overrides: tuple[str, ...],
    profile: str | None,
    address: str | None,
    tracking_uri: str | None,
    storage_path: str | None,
    given: dict[str, Any],
) -> None:
    """``submit --job``: the search file checked here, then ``normlab submit`` sent as a Ray job."""
    import shutil

    from orchestrator.running.jobs import JobError, JobRequest, cluster_path, dashboard_address, tracking_for_job

    working_dir: Path | None = given["working_dir"]
    try:
        dashboard = dashboard_address(address)
        tracking = tracking_for_job(tracking_uri)
        where = cluster_path(storage_path, "--storage-path", "a folder every node sees, or s3://...")
    except JobError as exc:
        raise UsageFailure(str(exc)) from exc
    space_arg = space
    scratch = None
    if Path(space).expanduser().is_file():  # a file here: it goes with the job
        if working_dir is not None:
            try:
                space_arg = str(path.resolve().relative_to(working_dir.resolve()))
            except ValueError:
                raise UsageFailure(
                    f"{space}: with --working-dir the search file must be inside {working_dir}"
                ) from None
        else:
            scratch = Path(tempfile.mkdtemp(prefix="normlab-job-"))
            shutil.copy2(path, scratch / path.name)
            working_dir, space_arg = scratch, path.name
    args = [space_arg, *overrides, *(["--profile", profile] if profile else [])]
    args += ["--tracking-uri", tracking, "--storage-path", where]
    request = JobRequest(
        search=name,
        command="submit",
        args=tuple(args),
        dashboard=dashboard,
        storage_path=where,
        working_dir=str(working_dir) if working_dir else None,
        entrypoint_num_cpus=given["entrypoint_num_cpus"],
        entrypoint_resources=_job_resources(given.get("entrypoint_resources")),
    )
    from orchestrator.running.jobs import mlflow_url

    try:
        _submit_job(request, f"search {name!r} checked here; MLflow: {mlflow_url(tracking, name)}")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


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
    _no_job_options(job, **given, address=address)
    if job:
        _resume_search_job(search, address, storage_path, num_cpus, given)
        return
    _check_resume_arguments(search, storage_path)
    _prepare_ray(address)
    from orchestrator.running.driver import resume_search
    from orchestrator.state.records import find_experiment

    with _search_errors(LookupError, ConnectionError), _stopped():  # no such search; an unreachable cluster
        folder = find_experiment(search, storage_path)
        outcome = resume_search(folder, address=address, num_cpus=num_cpus, console=console)
    _print_outcome(outcome, resumed=True)


def _resume_search_job(
    search: str, address: str | None, storage_path: str | None, num_cpus: int | None, given: dict[str, Any]
) -> None:
    """``resume --job``: the search found here when its storage is visible here, then ``normlab resume``
    sent as a Ray job."""
    from orchestrator.running.jobs import JobError, JobRequest, cluster_path, dashboard_address
    from orchestrator.state import storage
    from orchestrator.state.records import find_experiment

    if num_cpus is not None:
        raise UsageFailure("--num-cpus sizes a local Ray; a Ray job runs on the cluster (see --entrypoint-num-cpus)")
    try:
        dashboard = dashboard_address(address)
        if storage.is_uri(search) or search.startswith(("/", "~")):
            where = cluster_path(search, "SEARCH", "the search's folder as the cluster sees it")
            target, name = where, storage.resolve(where).name.rsplit("-", 2)[0]
        else:
            where = cluster_path(storage_path, "--storage-path", "the folder searches were stored in, or s3://...")
            target, name = search, search.rsplit("-", 2)[0] if search.count("-") >= 2 else search
    except JobError as exc:
        raise UsageFailure(str(exc)) from exc
    visible = storage.is_uri(where) or Path(where).is_dir()
    if visible:  # seen from here too: a search that is not there is refused before anything is sent
        try:
            folder = find_experiment(target, None if target == where else where)
        except (LookupError, OSError) as exc:
            raise UsageFailure(str(exc)) from exc
        name = folder.name.rsplit("-", 2)[0]
    args = [target] + ([] if target == where else ["--storage-path", where])
    request = JobRequest(
        search=name,
        command="resume",
        args=tuple(args),
        dashboard=dashboard,
        storage_path=storage.resolve(where).parent().uri if target == where else where,
        working_dir=str(given["working_dir"]) if given["working_dir"] else None,
        entrypoint_num_cpus=given["entrypoint_num_cpus"],
        entrypoint_resources=_job_resources(given.get("entrypoint_resources")),
    )
    _submit_job(request, f"resuming search {search!r} as a Ray job")


@main.command()
@click.argument("name", required=False)
@storage_path_option("Where searches were stored (default: {default}).")
@click.option(
    "--address",
    help="A Ray dashboard (http://HEAD:8265): show the state of the search's Ray jobs too "
    "(default: the dashboard a job-run search recorded).",
)
def status(name: str | None, storage_path: str | None, address: str | None) -> None:
    """Searches in the storage path: each trial (by its MLflow run name), state, epochs done, last metrics;
    for a search run as a Ray job, the job's state."""
    from orchestrator.running.jobs import JobError
    from orchestrator.running.status import search_status
    from orchestrator.state.storage import StorageError

    if address and not address.startswith(("http://", "https://")):
        raise UsageFailure(f"--address {address}: give the Ray dashboard's address, http://HEAD:8265")
    try:
        tables = search_status(storage_path, name, dashboard=address)
    except (StorageError, JobError) as exc:
        raise UsageFailure(str(exc)) from exc
    for table in tables:
        out.print(table, soft_wrap=True)


@main.command()
@click.argument("name")
@click.option("--address", help="The Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS when it is one).")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep printing until the job ends.")
def logs(name: str, address: str | None, follow: bool) -> None:
    """The output of the driver of search NAME's newest Ray job (NAME: a search name or a job's submission id)."""
    from orchestrator.running.jobs import JobError, find_job, follow_logs

    client = _job_client(address)
    try:
        job = find_job(client, name)
    except JobError as exc:
        raise UsageFailure(str(exc)) from exc
    console.print(f"Ray job {job.submission_id} ({job.status.value}):", soft_wrap=True, markup=False)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    follow_logs(client, job.submission_id, write, follow=follow)


@main.command()
@click.argument("name")
@click.option("--address", help="The Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS when it is one).")
@click.option(
    "--wait",
    "wait_s",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait for the job to end (0: do not wait).",
)
def stop(name: str, address: str | None, wait_s: float) -> None:
    """Stop the Ray job of search NAME: the driver ends Tune as Ctrl-C would (its state saved), the
    trials stop, and `normlab resume NAME --job` continues the search from the trials' checkpoints."""
    from orchestrator.running.jobs import META_STORAGE, TERMINAL, JobError, find_job, job_line, wait_for

    client = _job_client(address)
    try:
        job = find_job(client, name)
    except JobError as exc:
        raise UsageFailure(str(exc)) from exc
    dashboard = client.get_address()
    if job.status.value in TERMINAL:
        console.print(job_line(job, dashboard) + "; nothing to stop", soft_wrap=True, markup=False)
        return
    client.stop_job(job.submission_id)
    final = wait_for(client, job.submission_id, TERMINAL, wait_s) if wait_s else "stopping"
    console.print(f"Ray job {job.submission_id}: {final}", soft_wrap=True, markup=False)
    search = (job.metadata or {}).get("normlab.search", name)
    where = (job.metadata or {}).get(META_STORAGE)
    console.print(
        f"  continue it: normlab resume {search} --job --address {dashboard}"
        + (f" --storage-path {where}" if where else ""),
        soft_wrap=True,
        markup=False,
    )
    if wait_s and final not in TERMINAL:
        raise UsageFailure(f"the job did not end within {wait_s:g} s; `normlab status` shows its state")


@main.command()
@click.argument("name")
@tracking_uri_option("MLflow tracking URI (default: {default}).")
@click.option("--run-id", help="Parent run of the search (default: its latest run).")
@click.option(
    "--compare",
    help="Compare groups of trials by these keys (e.g. norm,regime): mean ± std over seeds, "
    "clean and every attack x eps, tracked vs batch statistics, with plots.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "markdown", "json"]), default="table", show_default=True
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --compare: folder for the tables and plots (default: normlab_runs/reports/<search run>).",
)
@click.option(
    "--log/--no-log",
    default=True,
    show_default=True,
    help="With --compare: also log the tables and plots to the search's parent MLflow run (report/).",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write clean vs adversarial accuracy per norm as PNG.",
)
def report(
    name: str,
    tracking_uri: str | None,
    run_id: str | None,
    compare: str | None,
    fmt: str,
    out_dir: Path | None,
    log: bool,
    plot: Path | None,
) -> None:
    """The results of search NAME from MLflow: one row per trial, or (--compare) the papers' table."""
    from orchestrator.reports.results import render, search_results, tradeoff_figure
    from orchestrator.tracking.search_run import TrackingUnreachable

    target = _reachable_tracking(tracking_uri, timeout=5)
    try:
        frame = search_results(target, name, run_id)
    except (LookupError, TrackingUnreachable) as exc:
        raise UsageFailure(str(exc)) from exc
    if compare:
        _compare_report(frame, target, [k.strip() for k in compare.split(",") if k.strip()], fmt, out_dir, log)
    else:
        rendered = render(frame, fmt)
        if fmt == "table":
            out.print(rendered)
        else:
            click.echo(rendered)
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        tradeoff_figure(frame).savefig(plot, dpi=120)
        console.print(f"wrote {plot}")


def _compare_report(
    frame: Any, target: TrackingTarget, keys: list[str], fmt: str, out_dir: Path | None, log: bool
) -> None:
    from orchestrator.reports import compare
    from orchestrator.reports.publish import log_report, study_of

    try:
        comp = compare.comparison(frame, keys)
    except LookupError as exc:
        raise UsageFailure(str(exc)) from exc
    if fmt == "table":
        out.print(compare.comparison_table(comp))
    else:
        click.echo(
            {
                "csv": compare.comparison_csv,
                "markdown": compare.comparison_markdown,
                "json": lambda c: c.to_json(orient="records", indent=2),
            }[fmt](comp)
        )
    folder = out_dir or Path("normlab_runs") / "reports" / str(frame.attrs["run_name"])
    files = compare.write_report(frame, keys, folder, study_of(frame))
    console.print(f"wrote {', '.join(sorted(files))} to {folder}")
    if log and log_report(target, frame.attrs["run_id"], files):
        console.print(f"logged them to the search's MLflow run {frame.attrs['run_id']} (artifacts report/)")


@main.command()
@tracking_uri_option("MLflow store to show (default: {default}).")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes the UI to the network."
)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Server worker processes.")
@click.option(
    "--allowed-hosts", help="Host names the UI may be reached by, when --host exposes it (MLflow refuses others)."
)
@click.option(
    "--search",
    "search",
    metavar="NAME",
    help="Open this search: its name (the newest such search) or its run name NAME-YYYYmmdd-HHMMSS. Default: the newest search.",
)
def ui(
    tracking_uri: str | None, host: str, port: int, workers: int, allowed_hosts: str | None, search: str | None
) -> None:
    """Serve the MLflow UI on the normlab store and print the URL of a search's runs table.

    The URL opens the runs of the newest search (or --search NAME): its parent run and one
    child run per trial, named by what varies. It goes through a page of normlab's that
    keeps MLflow's AI assistant from opening by itself (see orchestrator/tracking/links.py).
    """
    from orchestrator.tracking.links import runs_route, ui_url
    from orchestrator.tracking.search_run import TAG_SEARCH_RUN, find_search_run
    from orchestrator.tracking.target import resolve_tracking
    from orchestrator.ui.server import serve

    target = resolve_tracking(tracking_uri)
    shown_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    base = f"http://{f'[{shown_host}]' if ':' in shown_host else shown_host}:{port}"
    try:
        run = find_search_run(target, search)
    except Exception as exc:  # noqa: BLE001  (an unreadable store: the UI itself will say more)
        console.print(f"[yellow]warning:[/] cannot list the searches in {escape(target.uri)}: {escape(str(exc))}")
        run = None
    if run is None and search:
        raise UsageFailure(f"no search named {search!r} in {target.uri}")
    if run is not None:
        route = runs_route(run.info.experiment_id, run.data.tags.get(TAG_SEARCH_RUN, ""))
        what, expand = f"search {run.info.run_name}", run.info.run_id
    else:
        route, what, expand = "#/experiments?workflowType=machine_learning", "no search yet", ""
    url = ui_url(base, route, via_open_page=True, expand=expand)
    console.print(f"MLflow UI on {base} ({what}; store {escape(target.uri)}; Ctrl-C to stop):", soft_wrap=True)
    click.echo(url)
    args = ["ui", "--backend-store-uri", target.uri, "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        args += ["--allowed-hosts", allowed_hosts]
    if target.artifact_root:
        args += ["--default-artifact-root", target.artifact_root]
    serve(args)


def entry() -> None:
    """The `normlab` program (console script, ``python -m orchestrator.cli``): ``main``, with a
    search command ending the process at once when it is done (``_leave``)."""
    global _EXIT_AT_ONCE
    _EXIT_AT_ONCE = True
    main()


if __name__ == "__main__":  # pragma: no cover
    entry()
