# normlab developer entry points. Everything installs into .venv inside the checkout.
#   make quickstart    set up, then run the quickstart search (local Ray, local MLflow, digits)
#   make test          set up, then lint and run every test: the default suite, then the slow one (what CI runs)
#   make test-fast     the default suite only (fast: what to run while working)
#   make test-slow     the slow tests only (real data, killed workers, outages, several nodes, S3)
#   make lint          ruff check and ruff format --check on the whole tree
#   make bench         the benchmarks in benchmarks/
#   make bench-search-efficiency   Optuna (TPE, NSGA-II, with and without ASHA) vs the full grid on a
#                      RobustNorm space: trial-epochs to the grid's best (about 80 min on one core)
#   make gpu-check     on a CUDA machine: cuda tests, AMP, norms, throughput, GPU packing (QUICK=1: shorter);
#                      without CUDA it says so and runs its CPU part
#   make lock          refresh requirements/lock.txt after a change to pyproject.toml
#   make lock-upgrade  move every pin in requirements/lock.txt to the newest version allowed
#   make test-latest   build .venv-latest at the newest versions pyproject allows and run the
#                      default suite there: a dependency release that breaks us shows up here

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.normlab-installed
CHROMIUM ?= chromium

.PHONY: setup browser postgres quickstart test test-fast test-slow lint bench bench-search-efficiency gpu-check lock lock-upgrade test-latest clean

setup: $(STAMP) browser postgres

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

# The PostgreSQL tests (tests/test_postgres.py) start their own server on 127.0.0.1 from
# Debian's postgresql binaries (initdb, pg_ctl, run as the `postgres` user when we are root).
# Installed only when missing; apt-get needs root.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing PostgreSQL (apt-get) for the database tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else \
		echo "error: PostgreSQL is missing: the database tests (tests/test_postgres.py) need its server binaries." >&2; \
		echo "       On Debian/Ubuntu, as root: apt-get install -y postgresql  (or: sudo apt-get install -y postgresql)," >&2; \
		echo "       then run make again." >&2; \
		exit 1; \
	fi

# The environment is requirements/lock.txt, exactly: every package (transitive ones, pip and
# setuptools included) at the version the tests passed with, each file checked against its
# hash. It installs with --no-deps, so no resolver runs: torchattacks' requests pin (see
# requirements/nodeps.in) cannot pull anything in. A changed lock rebuilds the environment
# from scratch (a changed pyproject reinstalls normlab only), and setup ends by proving the environment is the lock
# (trainables/environment.py check), then records which lock it came from ($(VENV)/normlab-lock.txt,
# read into every run's tags).
LOCK = requirements/lock.txt

LOCKED = $(VENV)/.normlab-locked

$(LOCKED): $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	touch $(LOCKED)

# normlab itself (again when pyproject.toml changes: its entry points), then the proof
$(STAMP): pyproject.toml $(LOCKED)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m trainables.environment check $(LOCK)
	cp $(LOCK) $(VENV)/normlab-lock.txt
	$(PY) -c "import torch, torchvision, torchattacks, ray, mlflow, optuna; print('normlab environment ready: torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__, 'optuna', optuna.__version__)"
	touch $(STAMP)

lock:
	requirements/lock.sh

lock-upgrade:
	requirements/lock.sh --upgrade

# A second environment at the newest releases pyproject allows (no lock), and the default
# suite in it. First it names every package whose newest release differs from the lock, so a
# failure points at the release that caused it.
LATEST = .venv-latest
test-latest: browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test,cluster]'
	$(LATEST)/bin/python -m pip install --quiet --upgrade --no-deps -r requirements/nodeps.in
	@echo "== packages at the newest allowed release that differ from $(LOCK):"
	@$(LATEST)/bin/python -m trainables.environment diff $(LOCK)
	@$(LATEST)/bin/python -m pytest -p no:cacheprovider || { \
		echo "make test-latest: the default suite FAILS at the newest allowed releases; the packages above differ from the lock." >&2; \
		exit 1; }

quickstart: setup
	$(VENV)/bin/normlab submit quickstart

# The default suite runs in TEST_WORKERS processes (pytest-xdist; a test file stays in one, with its
# module's servers); the slow suite one test at a time: its kills, outages and node losses are timed.
TEST_WORKERS ?= 2
FAST  = -n $(TEST_WORKERS) --dist loadfile --durations=15
SLOW  = -m slow --durations=30

test: setup lint
	$(PY) -m pytest $(FAST)
	$(PY) -m pytest $(SLOW)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: setup
	$(PY) -m pytest $(FAST)

test-slow: setup
	$(PY) -m pytest $(SLOW)

bench: setup
	$(PY) benchmarks/bench_norms.py
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_trial.py
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_search.py

bench-search-efficiency: setup
	$(PY) benchmarks/bench_search_efficiency.py --grid-cache normlab_runs/bench/efficiency_grid.json \
		--runs-cache normlab_runs/bench/efficiency_runs.json --json-out normlab_runs/bench/search_efficiency.json

gpu-check: setup
	$(PY) benchmarks/gpu_check.py --out normlab_runs/gpu_check $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock .pytest_cache normlab_runs mlruns mlflow.db
