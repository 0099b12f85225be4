"""``normlab report --compare``: the table the papers print, and its plots.

From a search's trials as ``report.search_results`` reads them from MLflow (FINISHED runs
only), one row per group of trials that differ only in their seed: clean accuracy and
the accuracy under every attack at every eps, with the model's tracked statistics and
with the inference batch's statistics (Awais et al.'s BN / BNwoT, RNT / RN), as mean,
standard deviation and count over the seeds. The groups are the ``--compare`` keys (e.g.
``norm,regime``) plus any other key that varies in the search (never silently averaged
over), without ``seed``.

Plots: accuracy against eps per group (one panel per attack; dashed: batch statistics),
tracked against batch statistics as bars (clean and the primary attack at the primary
eps), and for Optuna searches the Pareto front of the search's objectives and the
study's parameter importances. ``write_report`` writes the tables (terminal text,
markdown, CSV) and the plots into a folder, for ``normlab report`` and for the search's
parent MLflow run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from orchestrator.tracking.tables import markdown_table
from trainables.diagnostics import SHIFT_AVERAGES
from trainables.metrics import BATCHSTATS, adv_metric

if TYPE_CHECKING:
    import pandas as pd

GROUP_EXCLUDED = ("seed",)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Clean accuracy, then every attack at every eps (ascending), tracked statistics first,
    then the same with batch statistics where they were measured, then the shift diagnostic's
    averages over layers where it ran."""
    attacks, eps = frame.attrs.get("attacks", []), frame.attrs.get("eps", [])
    tracked = ["final_clean_acc", *(adv_metric(a, e) for a in attacks for e in eps)]
    columns = [c for c in tracked if c in frame.columns]
    batch = [c + BATCHSTATS for c in columns if c + BATCHSTATS in frame.columns and frame[c + BATCHSTATS].notna().any()]
    shift = [c for c in SHIFT_AVERAGES if c in frame.columns and frame[c].notna().any()]
    return columns + batch + shift


def label(metric: str) -> str:
    """``final_clean_acc`` -> ``clean``; ``adv_acc_pgd_eps0.1_batchstats`` -> ``pgd 0.1 (batch)``;
    ``shift_mean_avg`` -> ``shift mean``."""
    if metric in SHIFT_AVERAGES:
        return metric.removesuffix("_avg").replace("_", " ")
    batch = metric.endswith(BATCHSTATS)
    base = metric.removesuffix(BATCHSTATS)
    text = "clean" if base == "final_clean_acc" else base.removeprefix("adv_acc_").replace("_eps", " ")
    return f"{text} (batch)" if batch else text


def group_keys(frame: pd.DataFrame, compare: list[str]) -> list[str]:
    """The ``compare`` keys, then every other grid key that varies (sampled keys and seeds are
    what a group's mean is taken over)."""
    sampled = frame.attrs.get("sampled", [])
    varying = [k for k in frame.attrs.get("varying", []) if k not in GROUP_EXCLUDED and k not in sampled]
    unknown = [k for k in compare if k not in frame.columns]
    if unknown:
        raise LookupError(
            f"--compare {','.join(unknown)}: not a key of this search's trials; keys that vary: "
            f"{', '.join(varying) or 'none'}"
        )
    return [*compare, *(k for k in varying if k not in compare and frame[k].nunique(dropna=False) > 1)]


def comparison(frame: pd.DataFrame, compare: list[str]) -> pd.DataFrame:
    """One row per group: its keys, ``n`` (finished trials), and ``<metric>_mean`` / ``_std`` for
    each metric column (std over seeds, ddof 1; NaN for a single trial)."""
    import pandas as pd

    keys = group_keys(frame, compare)
    finished = frame[frame["status"] == "FINISHED"]
    metrics = metric_columns(frame)
    rows = []
    grouped = finished.groupby(keys, sort=True, dropna=False) if keys else [((), finished)]
    for values, part in grouped:
        values = values if isinstance(values, tuple) else (values,)
        row: dict[str, Any] = dict(zip(keys, values))
        row["n"] = len(part)
        for m in metrics:
            row[f"{m}_mean"] = float(part[m].mean())
            row[f"{m}_std"] = float(part[m].std(ddof=1)) if len(part) > 1 else math.nan
        rows.append(row)
    result = pd.DataFrame(rows)
    result.attrs.update(frame.attrs, keys=keys, metrics=metrics)
    return result


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _grid(comp: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    keys, metrics = comp.attrs["keys"], comp.attrs["metrics"]
    header = [*keys, "n", *(label(m) for m in metrics)]
    body = [
        [str(r[k]) for k in keys] + [str(int(r["n"]))] + [_cell(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics]
        for _, r in comp.iterrows()
    ]
    return header, body


def comparison_table(comp: pd.DataFrame) -> Table:
    header, body = _grid(comp)
    over = ["seeds", *(f"sampled {k}" for k in comp.attrs.get("sampled", []))]
    table = Table(
        title=f"search {comp.attrs.get('search')} / {comp.attrs.get('run_name')}: mean ± std over {', '.join(over)}",
        caption="(batch): evaluated with the inference batch's statistics",
    )
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i < len(comp.attrs["keys"]) else "right")
    for row in body:
        table.add_row(*row)
    return table


def comparison_markdown(comp: pd.DataFrame) -> str:
    """The comparison table in markdown: the group keys left-aligned, ``n`` and the metrics right."""
    import pandas as pd

    header, body = _grid(comp)
    keys = len(comp.attrs["keys"])
    return markdown_table(pd.DataFrame(body, columns=header), right=header[keys:])


def comparison_csv(comp: pd.DataFrame) -> str:
    return comp.to_csv(index=False, float_format="%.6g").rstrip("\n")


# ------------------------------------------------------------------ plots


def _figure(width: float, height: float):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _group_label(row: Any, keys: list[str]) -> str:
    return " / ".join(str(row[k]) for k in keys) or "all trials"


def accuracy_vs_eps_figure(comp: pd.DataFrame):  # noqa: ANN201
    """Accuracy against eps (eps 0 = clean) per group, one panel per attack; dashed: batch
    statistics (for groups that have them); one legend beside the panels. None: no curve."""
    attacks, eps, keys = comp.attrs.get("attacks", []), comp.attrs.get("eps", []), comp.attrs["keys"]
    fig = _figure(4.5 * max(1, len(attacks)) + 2.5, 4.5)
    top = 0.0
    for j, attack in enumerate(attacks):
        ax = fig.add_subplot(1, len(attacks), j + 1)
        for i, (_, row) in enumerate(comp.iterrows()):
            for suffix, style in (("", "-"), (BATCHSTATS, "--")):
                names = ["final_clean_acc" + suffix, *(adv_metric(attack, e) + suffix for e in eps)]
                if f"{names[-1]}_mean" not in comp.columns:
                    continue
                means = [row[f"{n}_mean"] for n in names]
                if all(math.isnan(m) for m in means):  # e.g. batch statistics of a norm that tracks none
                    continue
                stds = [0.0 if math.isnan(row[f"{n}_std"]) else row[f"{n}_std"] for n in names]
                top = max([top, *(m + s for m, s in zip(means, stds) if not math.isnan(m))])
                ax.errorbar(
                    [0.0, *eps],
                    means,
                    yerr=stds,
                    fmt=style,
                    marker="o",
                    capsize=3,
                    color=f"C{i % 10}",
                    label=_group_label(row, keys) + (" (batch)" if suffix else ""),
                )
        ax.set_title(attack)
        ax.set_xlabel("eps (pixel scale)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    if not any(ax.lines for ax in fig.axes):  # no group has a curve (every trial failed before its final sweep)
        return None
    for ax in fig.axes:
        ax.set_ylim(0, min(1.02, max(0.1, top * 1.1)))
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="x-small")
    return fig


def tracked_vs_batch_figure(comp: pd.DataFrame):  # noqa: ANN201
    """Bars per group: clean and primary-attack accuracy, tracked against batch statistics. None: no bar."""
    import numpy as np

    attack, eps = comp.attrs.get("primary", ("", 0.0))
    keys = comp.attrs["keys"]
    metrics = [m for m in ("final_clean_acc", adv_metric(attack, eps)) if f"{m}_mean" in comp.columns]
    bars = [(m, s) for m in metrics for s in ("", BATCHSTATS) if f"{m}{s}_mean" in comp.columns]
    if not any(comp[f"{m}{s}_mean"].notna().any() for m, s in bars):
        return None  # nothing to draw (every trial failed before its final sweep)
    fig = _figure(max(6.0, 1.4 * len(comp) + 2.0), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(comp))
    width = 0.8 / max(1, len(bars))
    for b, (m, s) in enumerate(bars):
        means = comp[f"{m}{s}_mean"].to_numpy()
        stds = np.nan_to_num(comp[f"{m}{s}_std"].to_numpy())
        ax.bar(
            x + (b - (len(bars) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=3,
            label=label(m + s),
            color=f"C{metrics.index(m)}",
            alpha=1.0 if not s else 0.5,
            hatch="//" if s else None,
        )
    ax.set_xticks(x, [_group_label(r, keys) for _, r in comp.iterrows()], rotation=20, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("model's tracked statistics vs the inference batch's (hatched)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return fig


def pareto_figure(frame: pd.DataFrame, metrics: list[str], modes: list[str]):  # noqa: ANN201
    """Every finished trial on the first two objectives; the Pareto front joined and marked. None: no trial."""
    from orchestrator.studies.study import pareto_front

    finished = frame[frame["status"] == "FINISHED"]
    x, y = (f"last_{m}" for m in metrics[:2])
    if finished.empty or x not in finished or y not in finished:
        return None  # no finished trial to place
    points = list(zip(finished[x], finished[y]))
    front = sorted((points[i] for i in pareto_front(points, modes[:2])), key=lambda p: p[0])
    fig = _figure(6.5, 5)
    ax = fig.add_subplot()
    ax.scatter(finished[x], finished[y], color="C7", s=30, label="trials")
    ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="C3", label=f"Pareto front ({len(front)})")
    ax.set_xlabel(f"{metrics[0]} ({modes[0]}), last epoch")
    ax.set_ylabel(f"{metrics[1]} ({modes[1]}), last epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def importance_figure(study: Any, metrics: list[str]):  # noqa: ANN201
    """The study's parameter importances (fANOVA), one bar chart per objective."""
    import optuna

    fig = _figure(5.5 * len(metrics), 4)
    for j, metric in enumerate(metrics):
        target = (lambda t, j=j: t.values[j]) if len(metrics) > 1 else None
        importances = optuna.importance.get_param_importances(
            study, target=target, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
        ax = fig.add_subplot(1, len(metrics), j + 1)
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color=f"C{j}")
        ax.set_title(f"importance for {metric}")
        ax.set_xlim(0, 1)
    return fig


def write_report(frame: pd.DataFrame, compare: list[str], folder: Path, study: Any = None) -> dict[str, Path]:
    """The comparison as text, markdown and CSV and its plots (Optuna's too, given its study)
    in ``folder``; returns the files by name."""
    import io

    from rich.console import Console

    folder.mkdir(parents=True, exist_ok=True)
    comp = comparison(frame, compare)
    files = {"comparison.md": comparison_markdown(comp), "comparison.csv": comparison_csv(comp)}
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(comparison_table(comp))
    files["comparison.txt"] = console.export_text()
    written = {}
    for name, text in files.items():
        (folder / name).write_text(text + "\n")
        written[name] = folder / name
    figures = {
        "accuracy_vs_eps.png": accuracy_vs_eps_figure(comp),
        "tracked_vs_batch.png": tracked_vs_batch_figure(comp),
    }
    params = frame.attrs.get("search_params", {})
    metrics = _as_list(params.get("metric", "adv_acc"))
    if len(metrics) > 1:
        figures["pareto_front.png"] = pareto_figure(frame, metrics, _as_list(params.get("mode", "max"), len(metrics)))
    if (
        study is not None
        and len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 2
        and study.trials[0].params
    ):
        figures["param_importances.png"] = importance_figure(study, metrics)
    for name, fig in figures.items():
        if fig is None:  # nothing to draw
            continue
        fig.savefig(folder / name, dpi=110)
        written[name] = folder / name
    return written


def _as_list(value: str, n: int = 1) -> list[str]:
    """A param logged from a str or a list (``"['clean_acc', 'adv_acc']"``) back to a list."""
    text = str(value).strip()
    if text.startswith("["):
        return [v.strip().strip("'\"") for v in text.strip("[]").split(",") if v.strip()]
    return [text] * n
