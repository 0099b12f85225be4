"""normlab's orchestration: everything that knows Ray, MLflow, Optuna and the command line.

Grouped by job into sub-packages (docs/design.md, Layout, says which may import which):
``searchfile`` (the search-file language), ``running`` (a search on Ray Tune), ``state``
(a search's state in storage), ``tracking`` (MLflow), ``studies`` (Optuna), ``reports``,
``display`` (one trial's tables and plots), ``credentials`` (secrets in URIs), ``ui`` (the MLflow
UI app) and ``cli``.
Importing this package imports none of them; it only makes the module paths of the flat
layout before the sub-packages importable again (``moved``), for searches saved then.
"""

from orchestrator import moved

moved.install()
