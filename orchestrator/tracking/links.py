"""Links into the MLflow UI: a search's runs table and a run's page.

How MLflow 3.17's UI routes an experiment (its bundle in
``mlflow/server/js/build/static/js``; the snippets below are searchable there):

- Routes are hash routes: ``#/experiments/<id>`` and one per tab, among them
  ``#/experiments/<id>/runs`` (the runs table) and ``#/experiments/<id>/overview/:tab``
  (the GenAI overview of traces) (main.*.js, ``static get experimentPageTabRuns()``).
- ``#/experiments/<id>`` without a tab redirects to a default tab (chunk 5439.*.js,
  ``let l=s.fM.Runs;``): the runs table, except for a GenAI experiment kind, which gets
  the Overview. The kind comes from the UI's *workflow type*, not from the experiment:
  the feature switch that would read the experiment's ``mlflow.experimentKind`` tag is
  off in this build (main.*.js, ``Z0:()=>R`` with ``R=()=>!0`` makes the kind follow the
  workflow). The workflow type is the URL's ``workflowType`` query parameter
  (``genai`` | ``machine_learning``), else the browser's localStorage key
  ``mlflow.workflowType_v1``, else ``genai`` (main.*.js, ``key:"mlflow.workflowType"``).
  So a fresh browser lands on an empty trace Overview, whatever tag the experiment has
  (checked in Chromium: ``#/experiments/1`` with ``mlflow.experimentKind =
  custom_model_development`` still opens ``overview/usage?workflowType=genai``).
- The Overview greets with a "Detect Issues" AI pop-over; every page opens the "MLflow
  Assistant" side panel once per browser when the page's host is literally
  ``localhost``, ``127.0.0.1`` or ``::1`` (localStorage
  ``mlflow.assistant.fab.autoOpenedOnFirstLoad_v1``); no URL parameter or server setting
  turns that off.

So normlab links to the runs tab itself, with ``workflowType=machine_learning`` (the
model-training side bar, no GenAI pages) and a ``searchFilter`` on the tag every run of
one search carries (``normlab.search_run``), so the table shows that search's parent run
and trials even when the experiment holds several searches of the same name. The
experiment is also tagged ``mlflow.experimentKind = custom_model_development``, the value
the UI's own kind selector writes (chunk 2809.*.js): it labels it as model training in
MLflow's UI, and any UI that routes by the tag goes to the runs tab too. ``normlab ui``
serves MLflow with one extra page (``orchestrator.ui.server``, ``/normlab/open#<route>``)
that records the Assistant as already shown and the workflow as model training in the
browser (unless the user chose one), then opens the route: no AI pop-up greets the user.
The same page unfolds the search's parent run in the runs table (its trials are folded
under it by default), and on a first visit to the experiment shows the final clean and
adversarial accuracy as columns and a Run Name column wide enough for the names.

Every link normlab prints or stores goes through that page, so it opens the same in a
browser that never saw the UI (a link a team shares, a run's ``normlab.best_run_url``), in
one of two forms:

- ``/normlab/open?...#<route>``: the page's own address, only in the link to a local
  store's search that ``submit`` and ``normlab ui`` print (``normlab ui`` serves the page);
- MLflow's own address with ``?normlab=open`` (``/?normlab=open&...#<route>``): everywhere
  else, i.e. a search on an MLflow server and every link normlab stores. ``normlab ui`` and
  ``mlflow server --app-name normlab`` answer it with the same page; an MLflow without the
  plugin (a plain ``mlflow server``, ``mlflow ui`` on a local store) has no
  ``/normlab/open`` (404) but serves its UI at ``/`` whatever the query, and the UI routes
  by the ``#`` part alone: the link still opens its page, only without the page's settings
  (the Assistant then opens by itself where the host is loopback). A stored link outlives
  the server it was made on, so it takes the form that works on either.

The run link in a search's summary (the parent run's description) is relative,
``?normlab=open#<route>``: it works under whatever address the UI is browsed at, and its
copy (the browser resolves it) opens like the others.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from orchestrator.tracking.target import TrackingTarget
from orchestrator.tracking.trial_runs import TAG_SEARCH_RUN

DEFAULT_UI = "http://127.0.0.1:5000"  # what `normlab ui` serves by default
OPEN_PATH = "/normlab/open"  # orchestrator.ui.server's page: browser settings, then the route after '#'
# the same page at the UI's own address (``/?normlab=open``), where the plugin serves it (orchestrator.ui.server)
OPEN_QUERY = {"normlab": "open"}
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
WORKFLOW = "machine_learning"


def ui_base(target: TrackingTarget, default: str = DEFAULT_UI) -> str:
    """Where the UI of ``target`` is: an MLflow server's own address, else ``default``
    (a local store is browsed with ``normlab ui``)."""
    if target.is_server:
        return target.uri.rstrip("/")
    return default.rstrip("/")


def search_filter(search_run: str) -> str:
    """MLflow's filter for the runs of one search (its parent and every trial)."""
    return f"tags.`{TAG_SEARCH_RUN}` = '{search_run}'"


def runs_route(experiment_id: str, search_run: str = "") -> str:
    """``#/experiments/<id>/runs?...``: the runs table, model-training workflow, one search if named."""
    query = {"workflowType": WORKFLOW}
    if search_run:
        query["searchFilter"] = search_filter(search_run)
    return f"#/experiments/{quote(experiment_id)}/runs?{urlencode(query, quote_via=quote)}"


def run_route(experiment_id: str, run_id: str) -> str:
    """``#/experiments/<id>/runs/<run id>``: one run's page."""
    return f"#/experiments/{quote(experiment_id)}/runs/{quote(run_id)}?workflowType={WORKFLOW}"


def open_link(route: str, *, expand: str = "", at_root: bool = False) -> str:
    """``route`` (``#/...``) through normlab's page, relative to the UI's address:
    ``normlab/open?expand=...#<route>``, or (``at_root``) ``?normlab=open&expand=...#<route>``
    (see the module doc); ``expand``: a parent run whose trials the runs table shows unfolded."""
    path = "" if at_root else OPEN_PATH.lstrip("/")
    query = {**(OPEN_QUERY if at_root else {}), **({"expand": expand} if expand else {})}
    return f"{path}?{urlencode(query)}{route}" if query else f"{path}{route}"


def ui_url(base: str, route: str, *, via_open_page: bool = False, expand: str = "", at_root: bool = False) -> str:
    """The full URL of ``route`` (``#/...``) on the UI at ``base``; ``via_open_page``: through
    normlab's page (no AI assistant popping up; ``expand``: a parent run whose trials the runs
    table shows unfolded), at ``/normlab/open`` or (``at_root``) at ``/?normlab=open``."""
    if not via_open_page:
        return f"{base.rstrip('/')}/{route}"
    return f"{base.rstrip('/')}/{open_link(route, expand=expand, at_root=at_root)}"


def search_url(
    target: TrackingTarget, experiment_id: str, search_run: str = "", parent_run_id: str = "", ui: str | None = None
) -> str:
    """A search's runs table, through normlab's page, with the search's trials unfolded: on its
    MLflow server (``/?normlab=open``), or (a local store) as ``normlab ui`` serves it at ``ui``
    (default ``DEFAULT_UI``; ``/normlab/open``)."""
    return ui_url(
        ui_base(target, ui or DEFAULT_UI),
        runs_route(experiment_id, search_run),
        via_open_page=True,
        expand=parent_run_id,
        at_root=target.is_server,
    )


def run_url(target: TrackingTarget, experiment_id: str, run_id: str, ui: str | None = None) -> str:
    """One run's page, to store (``/?normlab=open``): on its MLflow server, or (a local store)
    as ``normlab ui`` serves it at ``ui`` (default ``DEFAULT_UI``)."""
    base = ui_base(target, ui or DEFAULT_UI)
    return ui_url(base, run_route(experiment_id, run_id), via_open_page=True, at_root=True)


def run_link(experiment_id: str, run_id: str) -> str:
    """``run_url`` without the address, for a link within the UI (a search's description)."""
    return open_link(run_route(experiment_id, run_id), at_root=True)
