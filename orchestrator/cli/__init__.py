"""The ``normlab`` command line: trial | validate | submit | resume | status | logs | stop | report | ui.

Every command reads flat ``KEY=VALUE`` overrides with the same names a search-space
file and MLflow's params use; ``submit`` and ``validate`` also take ``--profile NAME``, a
profile of the search file, merged before the overrides. Bad input is reported (file,
field, what is allowed) with exit code 2 before any work starts.

One module per kind of command, each registering on the group ``main`` (``common``):
``trial`` (one trial here), ``search`` (validate, submit, resume), ``jobs`` (a search's
driver as a Ray job: ``--job``, logs, stop), ``results`` (status, report, ui).
"""

from orchestrator.cli import jobs, results, search, trial  # noqa: F401 - each registers its commands on main
from orchestrator.cli.common import TrialFailure, UsageFailure, entry, main
from orchestrator.cli.trial import build_trial_config

__all__ = ["TrialFailure", "UsageFailure", "build_trial_config", "entry", "main"]
