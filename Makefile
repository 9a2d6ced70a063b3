# imagen-pipeline: common tasks. `make help` lists them.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled
# MLflow servers and clients started from here send no usage telemetry
export MLFLOW_DISABLE_TELEMETRY := true
export AIRFLOW__CORE__LOAD_EXAMPLES := False

.PHONY: help install test test-fast test-integration test-e2e smoke-test demo lint format bench airflow mlflow-ui services-up \
	services-down services-status trigger-tiny clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/imagen-pipeline: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is pinned: pip takes the CPU build from local disk, never a CUDA download
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/imagen-pipeline  ## create .venv and install the project with pinned dependencies

test: install  ## every tier: unit, integration, e2e (the README says how long each takes)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25 tests/e2e tests/integration tests/unit

test-fast: install  ## tests/unit: in-process, no subprocess, server or img2dataset run (under 3 min)
	$(BIN)/python -m pytest tests/unit

test-integration: install  ## tests/integration: real img2dataset, MLflow server, Airflow parsing, CLI subprocesses
	$(BIN)/python -m pytest tests/integration

test-e2e: install  ## tests/e2e: the DAG on running services, the smoke test, the learning test
	$(BIN)/python -m pytest tests/e2e

smoke-test: install  ## the whole pipeline on tiny data through `airflow dags test imagen_full`
	$(BIN)/python infra/smoke_test.py

demo: install  ## train a tiny cascade that follows its prompts (11-18 min on 2 cores): demo/grid.png
	$(BIN)/python infra/demo.py

lint: install  ## ruff
	$(BIN)/ruff check .

format: install  ## ruff format + import sorting
	$(BIN)/ruff check --fix --select I .
	$(BIN)/ruff format .

bench: install  ## every benchmark under bench/ (each prints a JSON line last)
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

MLFLOW_HOME ?= $(CURDIR)/.mlflow
AIRFLOW_HOME ?= $(CURDIR)/.airflow
SERVICES := $(BIN)/python infra/services.py --airflow-home $(AIRFLOW_HOME) --mlflow-home $(MLFLOW_HOME)

mlflow-ui: install  ## lean MLflow server on 127.0.0.1:5000 over .mlflow/ (foreground)
	$(SERVICES) mlflow

airflow: install  ## Airflow 3 on 127.0.0.1:8080: dag-processor, scheduler, triggerer, api-server, gpu pool (foreground)
	$(SERVICES) airflow

services-up: install  ## MLflow (:5000) + Airflow (:8080, with a triggerer) in the background, tasks logging to that MLflow
	$(SERVICES) up

services-down:  ## stop what services-up started
	$(SERVICES) down

services-status:  ## are the background services running?
	$(SERVICES) status

trigger-tiny: install  ## tiny data + `airflow dags trigger imagen_full` on the running services; waits
	AIRFLOW_HOME=$(AIRFLOW_HOME) $(BIN)/python infra/trigger_tiny.py

clean:  ## remove caches (not .venv)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
