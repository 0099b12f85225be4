"""Reading what searches left: ``normlab status`` (Ray Tune's state in the storage path, and a
search's Ray job), ``normlab report`` (MLflow's runs as tables and plots) and ``normlab ui``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

if TYPE_CHECKING:
    from orchestrator.tracking.target import TrackingTarget

from orchestrator.cli.common import (
    UsageFailure,
    console,
    main,
    out,
    reachable_tracking,
    storage_path_option,
    tracking_uri_option,
)


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

    target = reachable_tracking(tracking_uri, timeout=5)
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
