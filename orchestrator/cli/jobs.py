"""A search's driver as a Ray job (``submit --job``, ``resume --job``) and the commands that follow
one: ``normlab logs`` and ``normlab stop`` (the job logic itself: ``orchestrator.running.jobs``)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.common import F, UsageFailure, console, main, out


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


def refuse_job_options(job: bool, **given: Any) -> None:
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


def submit_search_job(
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


def resume_search_job(
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
