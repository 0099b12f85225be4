"""`normlab report SEARCH --compare norm`: the papers' table from MLflow, checked against the runs.

A real search over two norms and two seeds, then the comparison in every format: each
mean and standard deviation must equal what the MLflow runs hold, computed here
directly, and the tables and plots must land in the report folder and on the search's
parent run.
"""

from __future__ import annotations

import csv
import io
import statistics
import textwrap

import pytest
from click.testing import CliRunner
from conftest import markdown_table, run_normlab
from mlflow.tracking import MlflowClient

from orchestrator.cli import main

SPACE = """
name: compare
fixed: {dataset: digits, epochs: 2, train_subset: 384, batch_size: 64, eval_attacks: [fgsm, pgd], eval_eps: [0.05, 0.1],
        eval_steps: 2, epoch_adv_samples: 64, final_adv_samples: 96, test_subset: 96, lr: 0.1,
        shift_diagnostic: true}
grid: {norm: [batchnorm, robustnorm]}
seeds: [0, 1]
"""


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compare")
    (workdir / "space.yaml").write_text(textwrap.dedent(SPACE))
    proc = run_normlab("submit", "space.yaml", "--num-cpus", "2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, MlflowClient(tracking_uri=f"sqlite:///{workdir / 'normlab_runs' / 'mlflow.db'}")


def report(workdir, *args: str) -> str:
    result = CliRunner().invoke(
        main, ["report", "compare", "--tracking-uri", f"sqlite:///{workdir / 'normlab_runs' / 'mlflow.db'}", *args]
    )
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_comparison_holds_the_runs_numbers(search):
    workdir, client = search
    experiment = client.get_experiment_by_name("compare")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 4
    rows = list(
        csv.DictReader(
            io.StringIO(report(workdir, "--compare", "norm", "--format", "csv", "--out", str(workdir / "out")))
        )
    )
    assert [r["norm"] for r in rows] == ["batchnorm", "robustnorm"] and all(r["n"] == "2" for r in rows)
    metrics = [
        "final_clean_acc",
        "adv_acc_fgsm_eps0.05",
        "adv_acc_fgsm_eps0.1",
        "adv_acc_pgd_eps0.05",
        "adv_acc_pgd_eps0.1",
    ]
    for row in rows:
        group = [r for r in runs if r.data.params["norm"] == row["norm"]]
        assert sorted(r.data.params["seed"] for r in group) == ["0", "1"]  # grouped over seeds, not averaged away
        for metric in metrics + [m + "_batchstats" for m in metrics] + ["shift_mean_avg", "shift_var_avg"]:
            values = [r.data.metrics[metric] for r in group]
            assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-6), metric
            assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-6), metric

    markdown = report(workdir, "--compare", "norm", "--format", "markdown", "--no-log", "--out", str(workdir / "out"))
    header, aligns, body = markdown_table(markdown)
    assert header[:8] == ["norm", "n", "clean", "fgsm 0.05", "fgsm 0.1", "pgd 0.05", "pgd 0.1", "clean (batch)"]
    assert header[-3:] == ["pgd 0.1 (batch)", "shift mean", "shift var"]
    assert aligns == ["left"] + ["right"] * (len(header) - 1)  # the group key left, n and the metrics right
    assert [r[:2] for r in body] == [["batchnorm", "2"], ["robustnorm", "2"]]
    assert " ± " in body[0][2]
    for row in body:  # the CSV's numbers, as mean ± std to four decimals
        expected = next(r for r in rows if r["norm"] == row[0])
        mean, std = (float(v) for v in row[2].split(" ± "))
        assert mean == pytest.approx(float(expected["final_clean_acc_mean"]), abs=1e-4)
        assert std == pytest.approx(float(expected["final_clean_acc_std"]), abs=1e-4)
    table = report(workdir, "--compare", "norm", "--no-log", "--out", str(workdir / "out"))
    assert "mean ± std over seeds" in table and "robustnorm" in table

    files = {p.name for p in (workdir / "out").iterdir()}
    assert {"comparison.md", "comparison.csv", "comparison.txt", "accuracy_vs_eps.png", "tracked_vs_batch.png"} <= files
    assert all((workdir / "out" / f).stat().st_size > 5000 for f in files if f.endswith(".png"))
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/comparison.csv", "report/accuracy_vs_eps.png", "report/tracked_vs_batch.png"} <= logged


def test_an_unknown_compare_key_says_which_keys_vary(tmp_path):
    """Without a search to read: the error path of --compare, checked on a hand-made frame."""
    import pandas as pd

    from orchestrator.reports.compare import comparison

    frame = pd.DataFrame([{"status": "FINISHED", "norm": "batchnorm", "seed": "0", "final_clean_acc": 0.9}])
    frame.attrs.update(varying=["norm", "seed"], attacks=[], eps=[])
    with pytest.raises(LookupError, match="--compare regime: not a key of this search's trials; keys that vary: norm"):
        comparison(frame, ["regime"])
    comp = comparison(frame, ["norm"])
    assert comp.loc[0, "n"] == 1 and comp.loc[0, "final_clean_acc_mean"] == 0.9


def test_a_report_of_trials_that_all_failed_has_tables_and_no_empty_plots(tmp_path):
    import pandas as pd

    from orchestrator.reports.compare import write_report

    def frame(status: str) -> pd.DataFrame:
        rows = [
            {
                "status": status,
                "norm": norm,
                "seed": "0",
                "final_clean_acc": 0.9,
                "adv_acc_fgsm_eps0.1": 0.3,
                "last_clean_acc": 0.9,
                "last_adv_acc": 0.3,
            }
            for norm in ("batchnorm", "robustnorm")
        ]
        result = pd.DataFrame(rows)
        result.attrs.update(
            varying=["norm"],
            attacks=["fgsm"],
            eps=[0.1],
            primary=("fgsm", 0.1),
            search_params={"metric": "['clean_acc', 'adv_acc']", "mode": "max"},
        )
        return result

    written = write_report(frame("FAILED"), ["norm"], tmp_path / "failed")
    assert sorted(written) == ["comparison.csv", "comparison.md", "comparison.txt"]
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == sorted(written)
    written = write_report(frame("FINISHED"), ["norm"], tmp_path / "finished")
    assert {"accuracy_vs_eps.png", "tracked_vs_batch.png", "pareto_front.png"} <= set(written)
