# The README's commands. `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test install local testbin lint typecheck unit integration crds clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs the package with its dev extra (and re-installs when pyproject.toml changes).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $@

install: $(VENV)/.installed

# The README's first command: a small training run on this machine's CPU (no cluster, no store,
# no download): a tiny model and a generated shapes dataset in ./difftrain-local, then a progress
# bar, checkpoints, sample grids and exports in ./difftrain-local/output.
local: install
	$(BIN)/difftrain run --local

# Builds (first run on a machine) or reuses the pinned etcd/kube-apiserver/kube-controller-manager/
# kubectl/MinIO/helm/kwok binaries; cached in ~/.cache/difftrain/bin.
testbin:
	bash hack/build-binaries.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	@mkdir -p build/typecheck
	@ln -sfn ../../trainer build/typecheck/difftrain
	@ln -sfn ../../operator build/typecheck/difftrain_operator
	$(BIN)/mypy -p difftrain -p difftrain_operator -p tests

crds: install
	$(BIN)/difftrain crds --out crds
	$(BIN)/difftrain crds --out charts/difftrain/crds

# Everything: install, prepare the real test infrastructure, lint, type-check, run the suite
# (tests/e2e in a pytest process of its own beside the rest: hack/test.sh).
test: install
	@bindir=$$(bash hack/build-binaries.sh) && \
	$(MAKE) --no-print-directory lint typecheck && \
	DIFFTRAIN_TESTENV_BIN=$$bindir PYTEST=$(BIN)/pytest bash hack/test.sh $(PYTEST_ARGS)

unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
