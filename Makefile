# One-command set-up on a fresh machine: `make test` or `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned on the same command line so no other CUDA build is pulled in
	$(BIN)/pip install -q "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	cd proto && ../$(BIN)/buf lint
	# the contract as landed: a change that breaks wire or generated-code compatibility fails here
	cd proto && ../$(BIN)/buf breaking --against breaking-baseline.binpb

test: install lint
	$(BIN)/pytest -q

# developers: skip the experiment-sized tests
test-fast: install lint
	$(BIN)/pytest -q -m "not slow"

demo: install
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) examples/out bench/out .pytest_cache .ruff_cache
