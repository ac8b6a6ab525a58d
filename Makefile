# fedcore: two commands do everything on a fresh machine with Python 3.11.
#   make simulate   set up .venv, run the default simulation
#   make test       set up .venv, run the whole test suite (what CI runs)
#   make test-quick the fast subset (no slow end-to-end tests)
#   make mutants    mutation testing of the critical core (not part of make test; docs/testing.md)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedcore-installed
# The CPU build of torch goes in first, so the project's torch range is already met and
# pip never pulls a multi-GB CUDA build. Elsewhere: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup simulate test test-quick mutants lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

simulate: setup
	$(BIN)/fedcore simulate

test: setup
	$(BIN)/ruff check fedcore server clients tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=30

test-quick: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow"

# One module at a time, 2 workers (MUTANT_WORKERS), each with its fast tests; the last line
# printed is the JSON summary. Fails below a score of 0.90. Sandboxes: mutants/ (ignored).
MUTANT_WORKERS ?= 2
mutants: setup
	$(BIN)/python tests/mutation/run.py --workers $(MUTANT_WORKERS) --fail-under 0.90

lint: setup
	$(BIN)/ruff check fedcore server clients tests benchmarks
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs .pytest_cache
