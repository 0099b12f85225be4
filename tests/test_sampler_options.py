"""A search file's ``sampler_options`` reach the Optuna sampler and change what it does (TPE's
random start-up, NSGA-II's generation size), and options a sampler does not take, or values it
cannot take, are refused with the field, the sampler and what is allowed."""

from __future__ import annotations

import textwrap

import optuna
import pytest

from orchestrator.running.tuner import StudyRef, search_algorithm
from orchestrator.searchfile.load import load_space
from orchestrator.searchfile.space import SpaceError
from orchestrator.studies.study import make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = """
name: opts
fixed: {{dataset: digits, epochs: 2}}
sample:
  lr: {{loguniform: [0.01, 0.3]}}
search:
  algorithm: {algorithm}
  num_samples: 4
{extra}
"""


def space_file(tmp_path, extra: str, algorithm: str = "optuna"):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(SPACE).format(algorithm=algorithm, extra=textwrap.indent(extra, "  ")))
    return path


def xs(sampler, trials: int = 6) -> list[float]:
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.optimize(lambda t: -((t.suggest_float("x", 0, 1) - 0.3) ** 2), n_trials=trials)
    return [t.params["x"] for t in study.trials]


def test_tpe_models_after_its_startup_trials_not_after_optunas_ten():
    short, default = xs(make_sampler("tpe", 1, {"n_startup_trials": 2})), xs(make_sampler("tpe", 1))
    assert short[:2] == default[:2]  # both start with the same random draws
    assert short[2] != default[2]  # then one models, the other still draws at random (until trial 10)


def test_nsgaii_breeds_a_second_generation_after_population_size_trials():
    def generations(options):
        study = optuna.create_study(sampler=make_sampler("nsgaii", 1, options), directions=["maximize", "maximize"])
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=6)
        return [t.system_attrs["NSGAIISampler:generation"] for t in study.trials]

    assert generations({"population_size": 4}) == [0, 0, 0, 0, 1, 1]
    assert generations(None) == [0] * 6  # Optuna's default generation is 50 trials


def test_the_search_file_options_reach_the_searchers_sampler(tmp_path):
    spec, _ = load_space(str(space_file(tmp_path, "sampler_options: {n_startup_trials: 3, constant_liar: true}")), ())
    assert spec.search.sampler_options == {"n_startup_trials": 3, "constant_liar": True}
    searcher = search_algorithm(spec, StudyRef(f"sqlite:///{tmp_path / 'optuna.db'}", "opts-1"))
    sampler = searcher._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == 3 and sampler._constant_liar is True


@pytest.mark.parametrize(
    ("extra", "algorithm", "expected"),
    [
        ("sampler_options: {population_size: 8}", "optuna", "'population_size' is not an option of the tpe sampler"),
        ("sampler_options: {n_startup_trials: -1}", "optuna", "n_startup_trials must be an integer >= 0 (got -1)"),
        ("sampler_options: {n_startup_trials: true}", "optuna", "n_startup_trials must be an integer >= 0"),
        ("sampler: nsgaii\nsampler_options: {mutation_prob: 1.5}", "optuna", "mutation_prob must be a number from 0"),
        ("sampler: qmc\nsampler_options: {qmc_type: lattice}", "optuna", "qmc_type must be 'sobol' or 'halton'"),
        ("sampler_options: {group: true}", "optuna", "group: true needs multivariate: true"),
        ("sampler: random\nsampler_options: {seed: 3}", "optuna", "its options: none"),
        ("sampler_options: {n_startup_trials: 3}", "random", "they need algorithm optuna"),
    ],
)
def test_options_a_sampler_cannot_take_are_refused_before_anything_runs(tmp_path, extra, algorithm, expected):
    with pytest.raises(SpaceError) as caught:
        load_space(str(space_file(tmp_path, extra, algorithm)), ())
    message = str(caught.value)
    assert expected in message and "sampler_options" in message, message


def test_the_unknown_option_message_lists_the_samplers_options(tmp_path):
    with pytest.raises(SpaceError) as caught:
        load_space(str(space_file(tmp_path, "sampler: nsgaii\nsampler_options: {n_startup_trials: 5}")), ())
    assert "its options: population_size, mutation_prob, crossover_prob, swapping_prob" in str(caught.value)
