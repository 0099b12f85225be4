"""One trial's results as terminal tables and plots (``normlab trial``, its MLflow run).

The shift diagnostic's table and plot are drawn from the ``shift_*`` metric names and
values alone, so whoever holds a trial's final metrics (the trial, the driver) can draw them.

Kept apart from ``report`` (which reads MLflow) so that a trial run on its own, and the
tracking that draws a trial's plot, import neither MLflow's reporting side nor Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table

from trainables.diagnostics import AVERAGE, shift_metric, shifts_from_metrics
from trainables.metrics import adv_metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def final_table(
    final: dict[str, float], attacks: Sequence[str], eps_values: Sequence[float], eval_batch_size: int
) -> Table:
    """Clean and adversarial accuracy per attack (rows) and eps (columns).

    When the final sweep was also measured with batch statistics, each cell shows
    ``tracked / batch`` accuracy.
    """
    batch = "final_clean_acc_batchstats" in final
    title = "final accuracy" + (" (model's statistics / inference batch's statistics)" if batch else "")
    table = Table(title=title, caption=f"evaluation batch size {eval_batch_size}")
    table.add_column("attack")
    for eps in eps_values:
        table.add_column(f"eps {eps:g}", justify="right")

    def cell(key: str) -> str:
        text = f"{final[key]:.4f}"
        return f"{text} / {final[key + '_batchstats']:.4f}" if batch else text

    table.add_row("clean", *[cell("final_clean_acc")] * len(eps_values), end_section=True)
    for attack in attacks:
        table.add_row(attack, *[cell(adv_metric(attack, eps)) for eps in eps_values])
    return table


def robustness_figure(final: dict[str, float], attacks: Sequence[str], eps_values: Sequence[float]):  # noqa: ANN201
    """Accuracy against eps per attack (eps 0 = clean); dashed: with batch statistics."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    eps_sorted = sorted(eps_values)
    suffixes = [("", "-", "model's statistics")]
    if "final_clean_acc_batchstats" in final:
        suffixes.append(("_batchstats", "--", "batch statistics"))
    for i, attack in enumerate(attacks):
        for suffix, style, label in suffixes:
            ys = [final[f"final_clean_acc{suffix}"]] + [final[adv_metric(attack, e, suffix)] for e in eps_sorted]
            ax.plot([0.0, *eps_sorted], ys, style, marker="o", color=f"C{i}", label=f"{attack} ({label})")
    ax.set_xlabel("eps (pixel scale)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def shift_table(final: dict[str, float], attack: str | None = None, eps: float | None = None) -> Table | None:
    """Mean and variance shift per norm layer in depth order, then the average; None without shift metrics.

    ``attack`` and ``eps`` (the trial's primary pair) only name the attack in the title.
    """
    shifts = shifts_from_metrics(final)
    if not shifts:
        return None
    under = f"{attack} at eps {eps:g}" if attack is not None and eps is not None else "the primary attack"
    table = Table(
        title=f"norm-layer input shift under {under}",
        caption="mean over channels of |adv - clean| / s (variance: / s^2), s the layer's tracked scale",
    )
    table.add_column("layer")
    table.add_column("mean shift", justify="right")
    table.add_column("var shift", justify="right")
    for s in shifts:
        table.add_row(s.name, f"{s.mean:.4f}", f"{s.var:.4f}")
    mean_avg, var_avg = final.get(shift_metric("mean", AVERAGE)), final.get(shift_metric("var", AVERAGE))
    if mean_avg is not None and var_avg is not None:
        table.add_section()
        table.add_row("average", f"{mean_avg:.4f}", f"{var_avg:.4f}")
    return table


def shift_figure(final: dict[str, float]) -> Figure | None:
    """Bars of mean and variance shift per norm layer, input to output; dashed: the average.

    None when ``final`` holds no per-layer shift metrics (a trial without ``shift_diagnostic``).
    """
    shifts = shifts_from_metrics(final)
    if not shifts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.45 * len(shifts) + 2.5), 5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    positions = list(range(len(shifts)))
    for ax, kind, color, label in ((axes[0], "mean", "C0", "mean shift"), (axes[1], "var", "C1", "variance shift")):
        ax.bar(positions, [getattr(s, kind) for s in shifts], color=color)
        average = final.get(shift_metric(kind, AVERAGE))
        if average is not None:
            ax.axhline(average, color="k", linestyle="--", linewidth=1, label=f"average {average:.3g}")
            ax.legend(fontsize="small")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "norm-layer input shift under the primary attack\n(relative to each layer's tracked scale)", fontsize="medium"
    )
    axes[1].set_xticks(
        positions,
        [s.name for s in shifts],
        rotation=60 if len(shifts) > 4 else 0,
        ha="right" if len(shifts) > 4 else "center",
        fontsize="small",
    )
    axes[1].set_xlabel("norm layer (input to output)")
    return fig
