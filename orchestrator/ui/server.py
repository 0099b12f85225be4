"""normlab's MLflow UI app: MLflow's own server plus one page, ``/normlab/open``.

``/normlab/open?expand=<parent run>#/experiments/1/runs?...`` runs in the UI's own
origin, so it can set what MLflow's UI keeps in the browser's localStorage
(``orchestrator.tracking.links`` says why): the MLflow Assistant counts as already opened once
(it would otherwise open by itself on a loopback host); unless the user picked one, the
workflow is model training (the runs table, not the GenAI overview, wherever the UI falls
back to its default); the parent run is unfolded, so its trials show; and on a first
visit to the experiment, its table shows the final accuracies and names that fit. Then
it replaces itself with the route after ``#``. A key MLflow renames later only makes the
page a plain redirect.

The UI's own address with ``?normlab=open`` (``/?normlab=open&expand=...#<route>``) is the
same page here, and MLflow's UI on a server without this app (which has no
``/normlab/open``): the form of the links normlab stores, which open on either
(``orchestrator.tracking.links``).

It is an MLflow app plugin (entry point group ``mlflow.app``, name ``normlab``):
``mlflow server --app-name normlab`` serves it, and ``normlab ui`` runs MLflow's own
``mlflow ui`` command that way (``serve``), registering the entry point first when the
installed metadata predates it (an editable install made before it existed).
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint
from typing import Any

APP_NAME = "normlab"
APP_REF = "orchestrator.ui.server:app"
OPEN_PATH = "/normlab/open"  # the page (links.OPEN_PATH)
OPEN_PARAM = ("normlab", "open")  # ``/?normlab=open``: the page at the UI's own address (links.OPEN_QUERY)

# MLflow's UI keeps its settings in localStorage as <key>_v<version> = JSON, and each
# experiment page's table state under MLflowLocalStorage-1.1-ExperimentPage-["<id>"]-
# ReactComponentState, merged over its defaults (keys it does not know are ignored).
OPEN_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>normlab: opening MLflow</title></head>
<body><p>Opening the MLflow UI&hellip;</p>
<script>
(function () {
  var store = window.localStorage;
  var keep = function (key, value) {  // set unless the user (or MLflow) already did
    if (store.getItem(key) === null) store.setItem(key, JSON.stringify(value));
  };
  var route = location.hash || "#/";
  try {
    keep("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", true);
    keep("mlflow.assistant.panelOpen_v1", false);
    keep("mlflow.workflowType_v1", "machine_learning");
    var experiment = /^#\/experiments\/([^\/?]+)\/runs/.exec(route);
    if (experiment) {
      var key = "MLflowLocalStorage-1.1-ExperimentPage-" + JSON.stringify([decodeURIComponent(experiment[1])]) +
                "-ReactComponentState";
      var state = JSON.parse(store.getItem(key) || "null");
      if (!state || typeof state !== "object") {  // first visit: names readable, final accuracies shown
        state = {selectedColumns: ["metrics.`final_clean_acc`", "metrics.`final_adv_acc`"],
                 columnOrder: ["attributes.`Run Name`"], columnWidths: {"attributes.`Run Name`": 330}};
      }
      var expand = new URLSearchParams(location.search).get("expand");
      if (expand) {
        state.runsExpanded = state.runsExpanded || {};
        state.runsExpanded[expand] = true;
      }
      store.setItem(key, JSON.stringify(state));
    }
  } catch (e) {}  // no storage, or a format MLflow changed: open the page as it is
  location.replace(location.pathname.replace(/normlab\/open\/?$/, "") + route);
})();
</script></body></html>
"""


def _open_page() -> Any:  # a Flask view
    from flask import Response

    return Response(OPEN_PAGE, mimetype="text/html", headers={"Cache-Control": "no-store"})


def _open_page_at_root() -> Any:  # a Flask before_request hook: None lets MLflow answer
    from flask import request

    # "serve": the view of MLflow's UI page (``/``, under its static prefix if it has one)
    if request.endpoint == "serve" and request.args.get(OPEN_PARAM[0]) == OPEN_PARAM[1]:
        return _open_page()
    return None


def _build_app() -> Any:
    from mlflow.server import app as flask_app

    if "normlab_open" not in flask_app.view_functions:
        flask_app.add_url_rule(OPEN_PATH, "normlab_open", _open_page)
        flask_app.before_request(_open_page_at_root)
    # MLflow's ASGI app mounts this same Flask app: the page is served by MLflow's server,
    # behind its own host checks and middleware
    from mlflow.server.fastapi_app import app as asgi_app

    return asgi_app


def __getattr__(name: str) -> Any:
    # ``app`` is built on first use (by uvicorn, or MLflow's launcher checking what it is):
    # ``serve`` must register the plugin before anything imports ``mlflow.cli``, whose
    # ``--app-name`` choices are fixed when it is imported
    if name == "app":
        return _build_app()
    raise AttributeError(name)


def register_entry_point() -> None:
    """Make MLflow see ``normlab`` among its ``mlflow.app`` plugins, also from an install
    whose metadata lacks the entry point (pyproject declares it)."""
    from mlflow.utils import plugins

    found = plugins._get_entry_points
    if any(ep.name == APP_NAME for ep in found("mlflow.app")):
        return

    def with_normlab(group: str) -> list[EntryPoint]:
        points = list(found(group))
        if group == "mlflow.app":
            points.append(EntryPoint(name=APP_NAME, value=APP_REF, group="mlflow.app"))
        return points

    plugins._get_entry_points = with_normlab


def serve(args: list[str]) -> None:
    """``mlflow ARGS`` (e.g. ``ui --backend-store-uri ...``) in this process, serving this app."""
    register_entry_point()
    from mlflow.cli import cli

    cli.main(args=[*args, "--app-name", APP_NAME], prog_name="mlflow")


if __name__ == "__main__":  # python -m orchestrator.ui.server ui --backend-store-uri ... (what `normlab ui` runs)
    serve(sys.argv[1:])
