"""Tables and plots of results: one trial's final sweep, and a search's trials from MLflow."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from orchestrator.display.views import final_table, robustness_figure  # noqa: F401  (re-exported: one trial's views)
from orchestrator.tracking.client import client as mlflow_client
from orchestrator.tracking.search_run import PARENT_TAG, TAG_SEARCH
from orchestrator.tracking.tables import markdown_table
from trainables.diagnostics import SHIFT_AVERAGES

if TYPE_CHECKING:
    import pandas as pd

    from orchestrator.tracking.target import TrackingTarget

ALWAYS_SHOWN = ("norm", "regime")
NOT_COMPARED = ("init_from",)  # differs per trial by construction (a later stage's checkpoints)


# ------------------------------------------------------------------ searches in MLflow


def _parent_run(client: Any, experiment_id: str, name: str, run_id: str | None) -> Any:
    if run_id:
        return client.get_run(run_id)
    parents = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_SEARCH}` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    parents = [r for r in parents if PARENT_TAG not in r.data.tags]
    if not parents:
        raise LookupError(f"experiment {name!r} has no search run")
    return parents[0]


def _spec(client: Any, run_id: str) -> dict[str, Any]:
    """The resolved search space the parent run was logged with ({} if it cannot be read)."""
    import json
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as folder:
            return json.loads(Path(client.download_artifacts(run_id, "search_space.resolved.json", folder)).read_text())
    except Exception:  # an older run, or artifacts out of reach: group by every varying key
        return {}


def search_results(target: TrackingTarget, name: str, run_id: str | None = None) -> pd.DataFrame:
    """One row per trial of search ``name`` (its latest run, or ``run_id``): the keys that
    vary between trials, status, and the final clean and adversarial accuracies."""
    import pandas as pd

    client = mlflow_client(target)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments() if e.name != "Default")) or "none"
        raise LookupError(f"no search named {name!r} in {target.uri}; searches: {known}")
    parent = _parent_run(client, experiment.experiment_id, name, run_id)
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=10000
    )
    if not children:
        raise LookupError(f"search run {parent.info.run_name!r} ({parent.info.run_id}) has no trials yet")
    params = pd.DataFrame([c.data.params for c in children])
    varying = [
        c
        for c in params.columns
        if c not in ALWAYS_SHOWN and c not in NOT_COMPARED and params[c].nunique(dropna=False) > 1
    ]
    staged = any(c.data.tags.get("normlab.stage") for c in children)
    rows = []
    for child in children:
        row: dict[str, Any] = {"trial": child.info.run_name, "status": child.info.status}
        if staged:
            row["stage"] = child.data.tags.get("normlab.stage", "")
        row.update({k: child.data.params.get(k) for k in (*ALWAYS_SHOWN, *varying)})
        metrics = child.data.metrics
        row.update({k: metrics.get(k, math.nan) for k in ("final_clean_acc", "final_adv_acc")})
        row.update({k: v for k, v in sorted(metrics.items()) if k.startswith("adv_acc_")})
        row["final_clean_acc_batchstats"] = metrics.get("final_clean_acc_batchstats", math.nan)
        row.update({k: metrics.get(k, math.nan) for k in SHIFT_AVERAGES})  # the shift diagnostic, where it ran
        # the per-epoch metrics at the last epoch: what an Optuna study was told
        row.update({f"last_{k}": metrics.get(k, math.nan) for k in ("clean_acc", "adv_acc")})
        row["run_id"] = child.info.run_id
        rows.append(row)
    frame = pd.DataFrame(rows).sort_values("trial", kind="stable").reset_index(drop=True)
    first = children[0].data.params
    spec = _spec(client, parent.info.run_id)
    sampled = sorted({k for part in [spec, *spec.get("stages", {}).values()] for k in (part.get("sample") or {})})
    frame.attrs.update(
        sampled=sampled,
        search=name,
        run_name=parent.info.run_name,
        run_id=parent.info.run_id,
        tags=dict(parent.data.tags),
        search_params=dict(parent.data.params),
        varying=(["stage"] if staged else []) + [*ALWAYS_SHOWN, *varying],
        attacks=[a for a in first.get("eval_attacks", "").split(",") if a],
        eps=sorted(float(e) for e in first.get("eval_eps", "").split(",") if e),
        primary=(first.get("eval_attacks", "").split(",")[0], float(first.get("eval_eps", "0").split(",")[0])),
    )
    return frame


def _markdown(frame: pd.DataFrame) -> str:
    """Floats to four decimals, right-aligned; everything else as ``str`` writes it, left-aligned."""
    import pandas as pd

    floats = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    cells = frame.map(lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
    return markdown_table(cells, right=floats)


def render(frame: pd.DataFrame, fmt: str) -> Any:
    """``table`` (rich), ``csv``, ``markdown`` or ``json`` of a results frame."""
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return frame.to_json(orient="records", indent=2)
    if fmt == "markdown":
        return _markdown(frame)
    shown = [
        c
        for c in frame.columns
        if c != "run_id" and not c.startswith(("adv_acc_", "last_")) and not c.endswith("_batchstats")
    ]
    table = Table(title=f"search {frame.attrs.get('search')} / {frame.attrs.get('run_name')}")
    for column in shown:
        table.add_column(column, justify="right" if column.startswith("final_") else "left")
    for _, row in frame[shown].iterrows():
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    return table


def tradeoff_figure(frame: pd.DataFrame):  # noqa: ANN201
    """Clean (x) against adversarial (y) accuracy, one colour per norm, one marker per regime."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^v<>Px*"
    norms = sorted(frame["norm"].dropna().unique())
    regimes = sorted(frame["regime"].dropna().unique())
    for i, norm in enumerate(norms):
        for j, regime in enumerate(regimes):
            part = frame[(frame["norm"] == norm) & (frame["regime"] == regime)]
            if len(part):
                ax.scatter(
                    part["final_clean_acc"],
                    part["final_adv_acc"],
                    color=f"C{i % 10}",
                    marker=markers[j % len(markers)],
                    s=60,
                    label=f"{norm} / {regime}",
                )
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("adversarial accuracy (primary attack, primary eps)")
    ax.set_title(f"search {frame.attrs.get('search')}: {frame.attrs.get('run_name')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return fig
