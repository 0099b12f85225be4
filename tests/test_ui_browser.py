"""What a person sees in the MLflow UI after a real search, in a real headless Chromium.

``normlab submit`` runs three small trials on digits, ``normlab ui`` serves the store, and
Chromium (Debian's, driven by playwright; ``make setup`` installs it) opens the URL that
normlab printed: the search's runs table (not the GenAI overview), no AI assistant
popping up, the parent run unfolded with its trials under their readable names, the final
accuracies as columns, a chart of ``adv_acc`` per epoch, and the best trial on the parent
run's page. Screenshots land in the test's folder and in ``test-artifacts/ui-browser/``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from conftest import free_port, normlab_env, run_normlab, stop

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
        yield _printed_url(submit.stderr), ui_url
    finally:
        stop(proc)


@pytest.fixture
def browser_page(chromium, tmp_path):
    """A fresh Chromium profile (nothing remembered from an earlier visit), 1600x1000."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


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
    submit_url, ui_url = served
    # submit prints the URL `normlab ui` serves by default; `normlab ui --port P` the same one on its port
    assert submit_url.startswith("http://127.0.0.1:5000/normlab/open?expand=")
    assert urlsplit(ui_url)._replace(netloc="127.0.0.1:5000").geturl() == submit_url
    try:
        _look(browser_page, ui_url, tmp_path)
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
