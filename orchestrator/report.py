"""Tables and plots of results: one trial's final sweep, and a search's trials from MLflow."""

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
