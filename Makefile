# One-command set-up on a fresh machine: `make test` or `make demo`.
# Both install exactly requirements/dev.lock (every version pinned, torch the CPU build);
# `make lock` refreshes it from pyproject.toml's ranges; `make test-latest` is the drift canary.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/dev.lock
STAMP := $(VENV)/.installed
EXTRAS := dev,dask,zoo,evolve
# the CPU build of torch: this workplace keeps its wheel on disk (pip's find-links); elsewhere
# it comes from PyTorch's CPU index
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install lock test test-fast test-latest lint demo clean

# The stamp depends on the lock (and pyproject.toml, for the editable install's metadata):
# a second `make test` on the same checkout installs nothing.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps $(TORCH_SOURCE) -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# Re-resolve pyproject.toml's ranges (runtime + extras) and the tools to exact versions.
# (uv comes from the lock once installed; a first lock bootstraps it)
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv
	$(BIN)/uv pip compile pyproject.toml requirements/tools.in --extra dev --extra dask --extra zoo --extra gguf --extra evolve \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 $(TORCH_SOURCE) \
	  --constraint requirements/torch-cpu.txt --no-emit-find-links --no-emit-index-url \
	  --custom-compile-command "make lock" -o $(LOCK)

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

# Drift canary (not part of `make test`): the newest versions pyproject.toml allows, in their own
# venv, running the fast tests, so a peer's new release is seen on purpose.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q --upgrade $(TORCH_SOURCE) -r requirements/torch-cpu.txt -e ".[$(EXTRAS)]"
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/resolved.txt
	$(PY) scripts/lock_drift.py $(LOCK) .venv-latest/resolved.txt
	.venv-latest/bin/pytest -q -m "not slow" -p no:cacheprovider

demo: install
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) .venv-latest examples/out bench/out .pytest_cache .ruff_cache
