# The two commands a newcomer types: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The demo's own folder (marked by the demo when it creates it). `make run` resets it and
# `make clean` removes it; both refuse any folder the demo did not create. Your SWAY_HOME
# (real results) is never read or touched by either.
SWAY_DEMO_HOME ?= $(CURDIR)/.sway_demo
export SWAY_DEMO_HOME

.PHONY: run test lint bench bench-battery calibration ui clean clean-demo fixtures browser postgres

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so pip takes the CPU wheel on disk and never a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[hf,dagster,deploy,dev]"
	touch $(STAMP)

fixtures: $(STAMP)
	$(BIN)/sway fixtures build

run: $(STAMP)
	$(BIN)/python -m sway_dagster.demo

test: $(STAMP) browser postgres
	$(BIN)/python -m pytest -q

# Headless Chromium for tests/dagster/test_browser.py: Debian's package, installed once (as root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	}

# A PostgreSQL server for tests/dagster/test_deploy.py (deploy/postgres, run for real): Debian's
# package, installed once (as root); the test starts its own server on a loopback port.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
		echo "installing postgresql (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	}

lint: $(STAMP)
	$(BIN)/ruff check sway_engine sway_dagster tests bench
	$(BIN)/mypy sway_engine sway_dagster

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Where the full battery's time goes per probe and phase (adapter, nulls), fresh processes.
bench-battery: $(STAMP)
	$(BIN)/python -m bench.battery

# The calibration audit of the fixture battery (200 random adapters per null mode).
calibration: $(STAMP)
	$(BIN)/python -m bench.calibration

# The demo's UIs: Dagster and MLflow over the demo home (read only; nothing is reset).
ui: $(STAMP)
	@test -f $(SWAY_DEMO_HOME)/sway.yaml || { echo "run 'make run' first"; exit 1; }
	SWAY_HOME=$(SWAY_DEMO_HOME) DAGSTER_HOME=$(SWAY_DEMO_HOME)/dagster \
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000 & \
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(SWAY_DEMO_HOME)/mlflow.db --host 127.0.0.1 --port 5000; \
	kill %1

# Removes the demo home (only if the demo made it), the fixture cache and pytest's cache.
clean: clean-demo
	rm -rf .sway_cache .pytest_cache

clean-demo:
	$(PY) -m sway_dagster.demo clean
