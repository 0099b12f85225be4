"""What a person sees in the MLflow UI after a real search, in a real headless Chromium.

``normlab submit`` runs three small trials on digits, ``normlab ui`` serves the store, and
Chromium (Debian's, driven by playwright; ``make setup`` installs it) opens the URL that
normlab printed: the search's runs table (not the GenAI overview), no AI assistant
popping up, the parent run unfolded with its trials under their readable names, the final
accuracies as columns, a chart of ``adv_acc`` per epoch, and the best trial on the parent
run's page. The links normlab stores (the parent run's ``normlab.best_run_url`` tag, the
run link in its description as a browser resolves it) open the best trial's page just as
clean in a browser that never saw the UI (a new context: empty storage): what a team
sharing them gets (``normlab ui`` is ``mlflow server --app-name normlab``, ``ui`` being
MLflow's alias of ``server``). On a plain ``mlflow server`` (no normlab app) the same
stored link still opens the run's page, with MLflow's own Assistant panel (the control:
the clean checks do see the panel). Screenshots land in the test's folder and in
``test-artifacts/ui-browser/``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from conftest import BIN, free_port, normlab_env, run_normlab, stop, wait_for

pytestmark = pytest.mark.slow  # a search, a UI server and a browser: about a minute

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui-browser"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SPACE = """
name: uibrowse
fixed:
  dataset: digits
  model: cnn
  regime: pgd_at
  epochs: 2
  train_subset: 256
  batch_size: 64
  train_steps: 2
  eval_attacks: [pgd]
  eval_eps: [0.1]
  eval_steps: 2
  epoch_adv_samples: 64
  final_adv_samples: 64
grid:
  norm: [batchnorm, robustnorm]
  norm_power: {values: [0.2, 1.0], when: {norm: [robustnorm]}}
search: {algorithm: grid, metric: adv_acc, mode: max}
resources: {cpu: 1}
max_failures: 0
checkpoint: {every: 1, keep: 1}
"""
TRIALS = ("batchnorm pgd_at", "robustnorm pgd_at p=0.2", "robustnorm pgd_at p=1")


ASSISTANT_PANEL = re.compile("Ask questions about your experiments|Detect Issues")  # its greeting, the Overview's


@dataclass(frozen=True)
class Served:
    """A finished search in ``workdir``'s store and the ``normlab ui`` serving it."""

    submit_url: str  # the URL submit printed (for `normlab ui` on its default port)
    ui_url: str  # the URL `normlab ui` printed
    workdir: Path

    @property
    def base(self) -> str:
        return f"http://{urlsplit(self.ui_url).netloc}"


def _on(base: str, url: str) -> str:
    """``url`` on the UI at ``base`` (links name `normlab ui`'s default port; the test's UI has its own)."""
    return urlsplit(url)._replace(netloc=urlsplit(base).netloc).geturl()


def _printed_url(text: str) -> str:
    urls = re.findall(r"MLflow UI: (http\S+)", text)
    assert urls, text[-3000:]
    return urls[-1]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "Debian's chromium is needed: `make setup` installs it (as root: apt-get install -y chromium)"
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A finished search and `normlab ui` on it: (submit's URL, ui's URL, the ui's output file)."""
    workdir = tmp_path_factory.mktemp("browse")
    (workdir / "uibrowse.yaml").write_text(textwrap.dedent(SPACE))
    submit = run_normlab("submit", "uibrowse.yaml", "--num-cpus", "2", cwd=workdir)
    assert submit.returncode == 0, submit.stderr[-3000:]
    port = free_port()
    log = workdir / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)],
            cwd=workdir,
            env=normlab_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            pytest.fail(f"normlab ui did not answer in 180 s:\n{log.read_text()[-3000:]}")
        ui_url = next(line for line in log.read_text().splitlines() if line.startswith("http://"))
        yield Served(_printed_url(submit.stderr), ui_url, workdir)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def plain_mlflow(served):
    """A plain ``mlflow server`` (without normlab's app) on the search's store: its base URL."""
    port = free_port()
    log = served.workdir / "plain-mlflow.log"
    store = f"sqlite:///{served.workdir / 'normlab_runs' / 'mlflow.db'}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            + ["--backend-store-uri", store],
            cwd=served.workdir,
            env=normlab_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{base}/health", timeout=2).status_code == 200, 180, "mlflow server", proc, log)
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser(chromium):
    """Chromium, headless; each page below opens in a new context of its own (nothing remembered)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def fresh_page(browser):
    """Opens pages, each in a fresh browser context (empty storage: a browser that never saw the UI), 1600x1000."""
    contexts = []

    def page():
        contexts.append(browser.new_context(viewport={"width": 1600, "height": 1000}))
        return contexts[-1].new_page()

    yield page
    for context in contexts:
        context.close()


@pytest.fixture
def browser_page(fresh_page):
    """A page in a fresh browser context."""
    return fresh_page()


def _shows(locator, timeout_ms: int = 60_000) -> None:
    """Wait until one of the elements ``locator`` matches is visible: the UI fetches each part of a page on its own."""
    locator.filter(visible=True).first.wait_for(timeout=timeout_ms)


def _shoot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return shot


def test_the_printed_url_opens_the_searchs_runs_trials_and_charts(served, browser_page, tmp_path):
    # submit prints the URL `normlab ui` serves by default; `normlab ui --port P` the same one on its port
    assert served.submit_url.startswith("http://127.0.0.1:5000/normlab/open?expand=")
    assert _on("http://127.0.0.1:5000", served.ui_url) == served.submit_url
    try:
        _look(browser_page, served.ui_url, tmp_path)
    except BaseException:
        _shoot(browser_page, tmp_path, "failure.png")  # what the page showed instead
        raise


def _look(page, ui_url: str, tmp_path: Path) -> None:
    page.goto(ui_url)
    for name in TRIALS:  # the parent run is unfolded: its trials show, by their readable names
        page.get_by_role("link", name=name, exact=True).wait_for(timeout=90_000)
    page.wait_for_timeout(1000)  # let the table settle before looking
    route = urlsplit(page.url).fragment
    assert re.match(r"/experiments/\d+/runs\?", route) and "workflowType=machine_learning" in route  # not overview
    assert page.get_by_role("heading", name="Runs").is_visible()
    # no AI panel opened by itself (its chat box), nor the Overview's "Detect Issues" pop-over; the
    # assistant's small round button stays, with its label hidden until hovered
    assert page.get_by_placeholder(re.compile("Ask a question")).count() == 0
    assert page.get_by_text(re.compile("Ask questions about your experiments|Detect Issues")).count() == 0
    parent = page.locator("a", has_text=re.compile(r"^uibrowse-\d{8}-\d{6}$"))
    assert parent.count() == 1 and parent.is_visible()
    for name in TRIALS:
        link = page.get_by_role("link", name=name, exact=True)
        assert link.is_visible()
        assert link.evaluate("a => a.scrollWidth <= a.clientWidth + 1"), f"{name!r} is cut off in the table"
    for text in ("final_adv_acc", "final_clean_acc", "4 matching runs"):  # the last: the parent and three trials only
        _shows(page.locator(f"text={text}"))  # this search only: the parent and three trials
    _shoot(page, tmp_path, "runs-table.png")

    page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()
    card = page.locator("[data-testid=experiment-view-compare-runs-card]").filter(
        has=page.get_by_role("heading", name="adv_acc", exact=True)
    )
    card.wait_for(timeout=60_000)
    card.locator("svg.main-svg").first.wait_for(timeout=60_000)
    lines = card.locator("path.js-line")
    assert lines.count() >= len(TRIALS)  # one curve of adv_acc per trial
    assert all(lines.nth(i).get_attribute("d") for i in range(lines.count()))
    for name in TRIALS:
        _shows(card.get_by_text(f"{name} (adv_acc)"))  # the legend names the trials
    _shoot(page, tmp_path, "adv-acc-chart.png")

    page.locator("label:has(input[name=runs-view-mode][value=TABLE])").click()
    parent.first.click()  # the parent run's page: the search's summary
    page.get_by_text("Best trial by final_adv_acc (max)").wait_for(timeout=60_000)
    for name in TRIALS:  # the child runs the page lists under "Child runs" (fetched after the description shows)
        _shows(page.get_by_role("link", name=name, exact=True))
    best = page.locator("a[href*='/runs/'][href*='workflowType=machine_learning']", has_text="pgd_at")  # its link
    assert best.count() == 1 and best.inner_text() in TRIALS
    for text in ("3 trials: 3 finished", "best_final_adv_acc", "trials_finished"):
        _shows(page.locator(f"text={text}"))
    _shoot(page, tmp_path, "parent-run.png")


def _parent_run(base: str) -> tuple[str, str, dict[str, str]]:
    """The search's parent run, read from the UI's server: (experiment id, run id, tags)."""
    experiments = requests.post(f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 10}, timeout=10)
    ids = [e["experiment_id"] for e in experiments.json()["experiments"]]
    found = requests.post(
        f"{base}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": ids, "filter": "tags.`normlab.best_run_id` != ''"},
        timeout=10,
    ).json()["runs"]
    assert len(found) == 1, found
    info, tags = found[0]["info"], {t["key"]: t["value"] for t in found[0]["data"]["tags"]}
    return info["experiment_id"], info["run_id"], tags


def _opens_the_run(page, url: str, experiment: str, run_id: str, name: str) -> None:
    """``url`` shows run ``run_id``'s page, model training, the URL being the run's route itself."""
    page.goto(url)
    page.get_by_text("About this run").wait_for(timeout=90_000)
    _shows(page.get_by_role("heading", name=name, exact=True))  # the run's name, atop its page
    page.wait_for_timeout(2500)  # what MLflow opens by itself on its first load (the Assistant panel) has opened by now
    route = urlsplit(page.url).fragment
    assert route == f"/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning", page.url


def _assistant_shown(page) -> bool:
    return (
        page.get_by_placeholder(re.compile("Ask a question")).count() > 0
        or page.get_by_text(ASSISTANT_PANEL).count() > 0
    )


def test_stored_links_open_the_best_trial_clean_in_a_fresh_browser(served, fresh_page, tmp_path):
    experiment, parent_id, tags = _parent_run(served.base)
    best_id, best_name = tags["normlab.best_run_id"], tags["normlab.best_run_name"]
    run_route = f"#/experiments/{experiment}/runs/{best_id}?workflowType=machine_learning"
    stored = tags["normlab.best_run_url"]  # a local store's: `normlab ui` on its default address
    assert stored == f"http://127.0.0.1:5000/?normlab=open{run_route}"

    page = fresh_page()
    try:
        _opens_the_run(page, _on(served.base, stored), experiment, best_id, best_name)
        assert not _assistant_shown(page), "the MLflow Assistant opened over the run page"
        assert urlsplit(page.url).query == ""  # normlab's page replaced itself with the route
        stored_kept = page.evaluate("localStorage.getItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1')")
        assert stored_kept == "true"
        _shoot(page, tmp_path, "stored-best-run-url.png")

        # the parent run's description links the best trial: the link as the browser resolves it (what a person copies)
        page.goto(f"{served.base}/#/experiments/{experiment}/runs/{parent_id}?workflowType=machine_learning")
        page.get_by_text("Best trial by final_adv_acc (max)").wait_for(timeout=60_000)
        link = page.locator("a[href^='?normlab=open']", has_text=best_name)
        assert link.count() == 1
        summary_link = link.evaluate("a => a.href")
        assert summary_link == f"{served.base}/?normlab=open{run_route}"
    except BaseException:
        _shoot(page, tmp_path, "failure.png")
        raise

    page = fresh_page()
    try:
        _opens_the_run(page, summary_link, experiment, best_id, best_name)
        assert not _assistant_shown(page), "the MLflow Assistant opened over the run page"
        _shoot(page, tmp_path, "summary-link.png")
    except BaseException:
        _shoot(page, tmp_path, "failure.png")
        raise


def test_a_stored_link_opens_the_run_on_an_mlflow_without_normlabs_app(served, plain_mlflow, fresh_page, tmp_path):
    experiment, _, tags = _parent_run(served.base)
    assert requests.get(f"{plain_mlflow}/normlab/open", timeout=10).status_code == 404  # no normlab page there
    page = fresh_page()
    try:
        url = _on(plain_mlflow, tags["normlab.best_run_url"])
        _opens_the_run(page, url, experiment, tags["normlab.best_run_id"], tags["normlab.best_run_name"])
        assert urlsplit(page.url).query == "normlab=open"  # MLflow's UI ignored the query
        # MLflow's own behaviour on a loopback host, what normlab's page prevents: the checks above do see the panel
        assert _assistant_shown(page)
        _shoot(page, tmp_path, "plain-mlflow-stored-link.png")
    except BaseException:
        _shoot(page, tmp_path, "failure.png")
        raise
