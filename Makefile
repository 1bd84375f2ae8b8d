# Two commands a fresh clone needs: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel by default. GPU users: create .venv with their own torch build first, or override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export OPENBLAS_NUM_THREADS=1

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/no-deps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps -r requirements/no-deps.txt
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m deployment.simulate

# pytest-xdist workers, one torch thread each (tests/conftest.py). The full suite runs three on 2 cores: its
# end-to-end tests wait on Flower (start-up, heartbeats) while the others fill the cores. The fast lane is all CPU
# (in-process), so it runs one per core (three: 2 min 10 s instead of 1 min 53 s on a fresh clone).
TEST_WORKERS ?= 3
FAST_WORKERS ?= 2

test: $(STAMP)   ## the full suite (what CI runs): unit, in-process, Flower end-to-end
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

test-fast: $(STAMP)   ## unit + in-process tests only (no Flower processes, nothing slow)
	$(BIN)/python -m pytest -q -n $(FAST_WORKERS) -m "not slow and not e2e" --durations=15

bench: $(STAMP)
	$(BIN)/python -m benchmarks.core

clean:
	rm -rf $(VENV) .cache runs

# ---------------------------------------------------------------------------------------------------------------
# Deployment (docs/deployment.md). `e2e`: real processes on loopback with TLS + SuperNode authentication.
E2E_DIR        ?= $(CURDIR)/.cache/e2e
E2E_DOMAINS    ?= garden,kitchen,outdoor
E2E_RUN_CONFIG ?= epochs=2 coef-steps=20
# the run's artifacts: a new folder under runs/ (the ServerApp points runs/latest at it, as after `make run`)
E2E_STAMP      := $(shell date +%Y%m%d-%H%M%S)
E2E_RUN_DIR    ?= $(CURDIR)/runs/e2e-$(E2E_STAMP)

.PHONY: e2e e2e-containers compose-lint

e2e: $(STAMP)
	rm -rf $(E2E_DIR) && mkdir -p $(E2E_DIR)
	$(BIN)/python -m deployment.local --smoke --domains $(E2E_DOMAINS) --run-dir $(E2E_DIR)/smoke --timeout 300
	$(BIN)/python -m common.data.demo --out $(E2E_DIR)/data
	$(BIN)/python -m deployment.local --app . --domains $(E2E_DOMAINS) --data-root $(E2E_DIR)/data \
	    --run-dir $(E2E_DIR)/stack --timeout 1800 \
	    --run-config 'run-dir="$(E2E_RUN_DIR)" cache-dir="$(E2E_DIR)/cache" $(E2E_RUN_CONFIG)'
	$(BIN)/python -m deployment.check_artifacts $(E2E_RUN_DIR) --domains $(E2E_DOMAINS)

# Strict compose lint without a Docker engine: docker-compose 1.29.2 (`config -q` rejects unknown keys) in its own
# venv, since it needs PyYAML 5.4.1 built without isolation. Also checks compose.yaml matches federation.toml.
LINT_VENV ?= .venv-lint

$(LINT_VENV)/bin/docker-compose:
	$(PYTHON) -m venv $(LINT_VENV)
	printf '*\n' > $(LINT_VENV)/.gitignore
	$(LINT_VENV)/bin/pip install -q 'cython<3' wheel setuptools
	$(LINT_VENV)/bin/pip install -q --no-build-isolation pyyaml==5.4.1
	$(LINT_VENV)/bin/pip install -q docker-compose==1.29.2

compose-lint: $(STAMP) $(LINT_VENV)/bin/docker-compose
	$(BIN)/python -m deployment.compose --check
	$(LINT_VENV)/bin/docker-compose -f deployment/compose.yaml config -q
	@echo "compose-lint: deployment/compose.yaml OK"

# Containers: podman (rootful) builds the image from a local Debian base, brings up SuperLink + one SuperNode per
# domain (deployment/federation.toml) on their own network, runs the pipeline from the host, checks, tears down.
E2E_CONTAINERS_DIR        ?= $(CURDIR)/.cache/e2e-containers
E2E_CONTAINERS_RUN_CONFIG ?= $(E2E_RUN_CONFIG)
E2E_CONTAINERS_FLAGS      ?=# --cold: remove the image and its layers first, to time a cold build

e2e-containers: $(STAMP) compose-lint
	deployment/podman/setup.sh
	$(BIN)/python -m deployment.containers e2e $(E2E_CONTAINERS_FLAGS) --dir $(E2E_CONTAINERS_DIR) --run-config '$(E2E_CONTAINERS_RUN_CONFIG)'
