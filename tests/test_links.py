"""The links normlab prints and stores: every one goes through normlab's page (``/normlab/open``,
or the UI's own address with ``?normlab=open``, which an MLflow without the plugin still opens)."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

from orchestrator.tracking import links
from orchestrator.tracking.links import open_link, run_link, run_route, run_url, runs_route, search_url, ui_url
from orchestrator.tracking.summary import TrialRun, summarise
from orchestrator.tracking.target import TrackingTarget
from orchestrator.ui import server

LOCAL = TrackingTarget("sqlite:////x/normlab_runs/mlflow.db")
SERVER = TrackingTarget("http://mlflow.example:5000/")
RUN = "#/experiments/7/runs/abc?workflowType=machine_learning"


def test_the_runs_table_of_one_search_in_the_model_training_workflow():
    assert (
        runs_route("7", "s-20250101-000000")
        == "#/experiments/7/runs?workflowType=machine_learning&searchFilter=tags.%60normlab.search_run%60%20%3D%20%27s-20250101-000000%27"
    )
    assert run_route("7", "abc") == RUN


def test_the_printed_search_link_goes_through_the_page_on_a_local_store_and_on_a_server():
    # a local store: `normlab ui`'s own page (it always serves it), at the address given
    assert (
        search_url(LOCAL, "7", "", "abc", ui="http://127.0.0.1:5001")
        == "http://127.0.0.1:5001/normlab/open?expand=abc#/experiments/7/runs?workflowType=machine_learning"
    )
    assert search_url(LOCAL, "7").startswith("http://127.0.0.1:5000/normlab/open#/experiments/7/runs?")
    # a server, which may lack the plugin: its own address with ?normlab=open (was the plain route before)
    assert (
        search_url(SERVER, "7", "", "abc")
        == "http://mlflow.example:5000/?normlab=open&expand=abc#/experiments/7/runs?workflowType=machine_learning"
    )
    assert (
        search_url(SERVER, "7")
        == "http://mlflow.example:5000/?normlab=open#/experiments/7/runs?workflowType=machine_learning"
    )


def test_stored_run_links_take_the_form_any_mlflow_opens():
    assert run_url(LOCAL, "7", "abc") == f"http://127.0.0.1:5000/?normlab=open{RUN}"
    assert run_url(LOCAL, "7", "abc", ui="http://127.0.0.1:5001/") == f"http://127.0.0.1:5001/?normlab=open{RUN}"
    assert run_url(SERVER, "7", "abc") == f"http://mlflow.example:5000/?normlab=open{RUN}"
    assert run_url(TrackingTarget("https://host/mlflow"), "7", "abc") == f"https://host/mlflow/?normlab=open{RUN}"
    # the description's link, relative: wherever the UI is browsed, what the browser resolves is run_url's form
    assert run_link("7", "abc") == f"?normlab=open{RUN}"
    browsed = "http://head:5000/#/experiments/7/runs/parent?workflowType=machine_learning"
    assert urljoin(browsed, run_link("7", "abc")) == f"http://head:5000/?normlab=open{RUN}"


def test_the_page_and_its_address_forms():
    assert open_link(RUN) == f"normlab/open{RUN}"
    assert open_link(RUN, expand="p 1") == f"normlab/open?expand=p+1{RUN}"
    assert open_link(RUN, at_root=True, expand="p") == f"?normlab=open&expand=p{RUN}"
    assert ui_url("http://h:1/", RUN) == f"http://h:1/{RUN}"  # not through the page
    assert ui_url("http://h:1", RUN, via_open_page=True) == f"http://h:1/normlab/open{RUN}"
    assert ui_url("http://h:1", RUN, via_open_page=True, at_root=True) == f"http://h:1/?normlab=open{RUN}"
    # the app plugin answers the same query and path (orchestrator.ui imports nothing of orchestrator's)
    assert dict([server.OPEN_PARAM]) == links.OPEN_QUERY
    assert urlsplit(ui_url("http://h:1", RUN, via_open_page=True)).path == links.OPEN_PATH == server.OPEN_PATH


def test_the_summary_stores_the_links_it_is_given():
    trials = [TrialRun("a", "r1", "FINISHED", metrics={"final_adv_acc": 0.5}), TrialRun("b", "r2", "FINISHED")]
    summary = summarise(
        trials,
        metric="adv_acc",
        mode="max",
        link=lambda run_id: run_url(SERVER, "7", run_id),
        note_link=lambda run_id: run_link("7", run_id),
    )
    url = "http://mlflow.example:5000/?normlab=open#/experiments/7/runs/r1?workflowType=machine_learning"
    assert summary.tags["normlab.best_run_url"] == url
    assert "[a](?normlab=open#/experiments/7/runs/r1?workflowType=machine_learning)" in summary.note
