# normlab developer entry points. Everything installs into .venv inside the checkout.
#   make quickstart   set up, then run the quickstart search (local Ray, local MLflow, digits)
#   make test         set up, then run every test: the default suite, then the slow one (what CI runs)
#   make test-fast    the default suite only (fast: what to run while working)
#   make test-slow    the slow tests only (real data, killed workers, outages, several nodes, S3)
#   make bench        the benchmarks in benchmarks/

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.normlab-installed

.PHONY: setup quickstart test test-fast test-slow bench clean

setup: $(STAMP)

# torchattacks goes in last and with --no-deps: it pins requests~=2.25.1, which MLflow
# cannot use; its real needs (torch, torchvision, scipy, tqdm, numpy, requests) are ours.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps 'torchattacks==3.5.1'
	$(PY) -c "import torch, torchvision, torchattacks, ray, mlflow, optuna; print('normlab environment ready: torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"
	touch $(STAMP)

quickstart: setup
	$(VENV)/bin/normlab submit quickstart

test: setup
	$(PY) -m pytest
	$(PY) -m pytest -m slow

test-fast: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

bench: setup
	$(PY) benchmarks/bench_norms.py
	$(PY) benchmarks/bench_trial.py
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache normlab_runs mlruns mlflow.db
