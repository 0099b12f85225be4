"""What a search file may tell each Optuna sampler (``search.sampler_options``), and the check.

The options are the samplers' own constructor arguments, by the names Optuna gives them
(``studies.make_sampler`` passes them on as they are): how many random trials TPE or CMA-ES
runs before modelling (``n_startup_trials``), TPE's multivariate model and its constant
liar for trials that run at once, NSGA-II's generation size (``population_size``) and its
mutation and crossover rates, QMC's sequence. Anything else a sampler takes (callables,
strategies) has no place in a file. Each entry: what the value must be, and a test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trainables.problems import short_repr

Check = tuple[str, Callable[[Any], bool]]


def _integer(low: int) -> Check:
    return f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(low: float, high: float | None = None, *, open_low: bool = False) -> Check:
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (v > low if open_low else v >= low) and (high is None or v <= high)

    bounds = f"> {low:g}" if open_low else (f"from {low:g} to {high:g}" if high is not None else f">= {low:g}")
    return f"a number {bounds}", ok


FLAG: Check = ("true or false", lambda v: isinstance(v, bool))
PROBABILITY = _number(0.0, 1.0)

SAMPLER_OPTIONS: dict[str, dict[str, Check]] = {
    "tpe": {
        "n_startup_trials": _integer(0),  # random trials before TPE models (Optuna's default 10)
        "n_ei_candidates": _integer(1),
        "multivariate": FLAG,
        "group": FLAG,
        "constant_liar": FLAG,  # trials running at once count as bad guesses until they report
        "consider_endpoints": FLAG,
    },
    "nsgaii": {
        "population_size": _integer(2),  # trials per generation (Optuna's default 50)
        "mutation_prob": PROBABILITY,
        "crossover_prob": PROBABILITY,
        "swapping_prob": PROBABILITY,
    },
    "cmaes": {
        "n_startup_trials": _integer(0),
        "sigma0": _number(0.0, open_low=True),
        "popsize": _integer(1),
        "use_separable_cma": FLAG,
        "with_margin": FLAG,
        "lr_adapt": FLAG,
    },
    "qmc": {
        "qmc_type": ("'sobol' or 'halton'", lambda v: v in ("sobol", "halton")),
        "scramble": FLAG,
    },
    "random": {},
}


def sampler_option_problems(sampler: str, options: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``options`` for ``sampler`` (normlab's name), one message each."""
    allowed = SAMPLER_OPTIONS[sampler]
    problems = []
    for key, value in options.items():
        if key not in allowed:
            names = ", ".join(allowed) or "none"
            problems.append(f"{short_repr(key)} is not an option of the {sampler} sampler; its options: {names}")
            continue
        wanted, ok = allowed[key]
        if not ok(value):
            problems.append(f"{key} must be {wanted} (got {short_repr(value)})")
    if sampler in ("tpe",) and options.get("group") and not options.get("multivariate"):
        problems.append("group: true needs multivariate: true (Optuna's TPE groups only a multivariate model)")
    return problems
