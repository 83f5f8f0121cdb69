# The two commands a newcomer types: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SWAY_HOME ?= $(CURDIR)/.sway_home
export SWAY_HOME

.PHONY: run test lint bench ui clean fixtures browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so pip takes the CPU wheel on disk and never a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[hf,dagster,dev]"
	touch $(STAMP)

fixtures: $(STAMP)
	$(BIN)/sway fixtures build

run: $(STAMP)
	$(BIN)/python -m sway_dagster.demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Headless Chromium for tests/dagster/test_browser.py: Debian's package, installed once (as root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	}

lint: $(STAMP)
	$(BIN)/ruff check sway_engine sway_dagster tests bench
	$(BIN)/mypy sway_engine

bench: $(STAMP)
	$(BIN)/python -m bench.run

ui: $(STAMP)
	@test -f $(SWAY_HOME)/sway.yaml || { echo "run 'make run' first"; exit 1; }
	DAGSTER_HOME=$(SWAY_HOME)/dagster $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000 & \
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(SWAY_HOME)/mlflow.db --host 127.0.0.1 --port 5000; \
	kill %1

clean:
	rm -rf $(SWAY_HOME) .sway_cache .pytest_cache
