"""Metric names: what a trial reports, by one rule that the trial, the search and the reports share.

Every epoch: ``EPOCH_METRICS`` (``adv_acc`` is the first of ``eval_attacks`` at the first of
``eval_eps``). After the last epoch, the final sweep: ``final_clean_acc``, ``final_adv_acc``,
one ``adv_metric(attack, eps)`` per evaluated pair, the same again with the inference batch's
statistics (``BATCHSTATS`` suffix) for norms that have statistic modes, and with
``shift_diagnostic`` the ``shift_*`` metrics. docs/design.md ("Metric names") lists them.
"""

from __future__ import annotations

EPOCH_METRICS = ("clean_acc", "adv_acc", "train_loss", "train_acc")  # in the order tables show them
BATCHSTATS = "_batchstats"
SHIFT_PREFIX = "shift_"


def adv_metric(attack: str, eps: float, suffix: str = "") -> str:
    """Metric name of one attack x eps pair, e.g. ``adv_acc_pgd_eps0.1``."""
    return f"adv_acc_{attack}_eps{eps:g}{suffix}"


def is_final_metric(name: str) -> bool:
    """Metrics of the final sweep (``final_*``, ``adv_acc_<attack>_eps<eps>[_batchstats]``, ``shift_*``)."""
    return name.startswith(("final_", "adv_acc_", SHIFT_PREFIX))
