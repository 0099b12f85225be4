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
CHROMIUM ?= chromium

.PHONY: setup browser quickstart test test-fast test-slow bench clean

setup: $(STAMP) browser

# The browser test (tests/test_ui_browser.py) drives Debian's Chromium through playwright,
# which never downloads a browser of its own. Installed only when missing; apt-get needs root.
browser:
	@if command -v $(CHROMIUM) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium (apt-get) for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM); \
	else \
		echo "error: Chromium is missing: the browser test (tests/test_ui_browser.py) needs it." >&2; \
		echo "       On Debian/Ubuntu, as root: apt-get install -y chromium  (or: sudo apt-get install -y chromium)," >&2; \
		echo "       then run make again." >&2; \
		exit 1; \
	fi

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
