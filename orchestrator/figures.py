"""Plots of one trial's results, shared by its MLflow run and ``normlab report``.

Kept apart from ``report`` (which reads MLflow) so that tracking can draw a trial's plot
without importing the reporting side.
"""

from __future__ import annotations

from collections.abc import Sequence

from trainables.trial import adv_metric


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
