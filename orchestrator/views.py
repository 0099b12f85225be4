"""One trial's results as a terminal table and a plot (``normlab trial``, its MLflow run).

Kept apart from ``report`` (which reads MLflow) so that a trial run on its own, and the
tracking that draws a trial's plot, import neither MLflow's reporting side nor Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from trainables.trial import adv_metric


def final_table(final: dict[str, float], attacks: Sequence[str], eps_values: Sequence[float], eval_batch_size: int) -> Table:
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
