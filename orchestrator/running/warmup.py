"""What every Ray worker of a search imports the moment it starts, before a trial is given to it.

``init_ray`` names ``warm_up`` as the job's ``worker_process_setup_hook``: Ray runs it in
each worker process as the process starts, before the worker takes its trial. Ray starts a
trial's worker when the Tuner asks for the trial's actor (Tune gives its actors a
``runtime_env``, so the idle workers Ray starts with a cluster never serve a trial), and the
few seconds of torch, torchattacks, MLflow and normlab imports are paid there, once per
worker: with ``reuse_actors`` a worker then runs one trial after another without importing
again, and the first epoch's timing is the training's, not the imports'. The datasets the
search uses (``DATASETS_ENV``, set by the driver) have their loaders' modules imported too
(scikit-learn for ``digits``).

A hook that raises makes Ray drop the worker, so ``warm_up`` never raises: a module that
cannot be imported here fails later, in the trial, with its own error.
"""

from __future__ import annotations

import importlib
import logging
import os

DATASETS_ENV = "NORMLAB_WARM_UP_DATASETS"
# what a trial imports, heaviest first: the trainable, its training and attacks, the MLflow tracker
MODULES = (
    "trainables.ray_trainable",
    "trainables.trial",
    "torch._dynamo",  # torch.optim imports it on an optimizer's first construction (seconds)
    "torchattacks",
    "orchestrator.tracking.trial_runs",
    "mlflow.tracking",
    "orchestrator.display.views",  # the run's robust-accuracy plot, made when the trial ends
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
)

log = logging.getLogger("normlab.warmup")


def warm_up() -> None:
    """Import what a trial will need (``MODULES``, and the search's datasets' loaders); never raises."""
    from trainables import profiling

    profiling.record("worker.boot", profiling.process_started())  # the process and Ray's worker, to here
    with profiling.span("worker.warm_up"):
        for name in MODULES:
            _try_import(name)
        try:
            from trainables.data import loader_modules

            for dataset in filter(None, os.environ.get(DATASETS_ENV, "").split(",")):
                for name in loader_modules(dataset):
                    _try_import(name)
        except Exception as exc:  # noqa: BLE001 - see the module doc
            log.debug("warm-up of the datasets' loaders skipped: %s", exc)


def _try_import(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - see the module doc
        log.debug("warm-up: cannot import %s: %s", name, exc)
