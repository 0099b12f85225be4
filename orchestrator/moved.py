"""Import aliases for the flat layout of normlab 0.1 (``orchestrator/<module>.py``).

Ray Tune pickles the classes of a search's driver-side objects into its saved state
(``tuner.pkl``, the searcher's state): the Tune callbacks, the MLflow tracker, the Optuna
searcher and its define-by-run space, the search-space models. A search started before
orchestrator/ was grouped into sub-packages names them by their old module paths, e.g.
``orchestrator.callbacks.TrialRunsCallback``; so that ``normlab resume`` can still load it,
each old path imports as the module that now holds those classes. The aliases are found
lazily (a finder on ``sys.meta_path``, installed by ``orchestrator/__init__``), so none of
the modules is imported until something asks for it. tests/test_legacy_state.py resumes a
search saved by that layout (tests/fixtures/legacy_search_state.tar.gz).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

# old module path -> the module that now holds its classes
MOVED = {
    "orchestrator.callbacks": "orchestrator.running.callbacks",
    "orchestrator.trial_runs": "orchestrator.tracking.trial_runs",
    "orchestrator.study": "orchestrator.studies.study",
    "orchestrator.tuner": "orchestrator.running.tuner",
    "orchestrator.spaces": "orchestrator.searchfile.space",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module that replaced it."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported under its new name."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
