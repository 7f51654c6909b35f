# The two commands of the README. Each does its own set-up in .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[demo]"
	touch $@

## make demo: simulator + controller + broker + live view (Ctrl-C stops all, pump and heater first)
demo: $(VENV)/.demo
	$(BIN)/ilup demo -c config/sim.yaml

## make test: system packages (installed when root, else the one command to run), ruff,
## mypy --strict, the whole pytest suite
test: $(VENV)/.test
	scripts/system-deps.sh
	$(BIN)/ruff check ilup_controller sim tests benchmarks
	$(BIN)/mypy ilup_controller sim
	$(BIN)/pytest

## make bench: performance and control-quality tables (not part of the test suite)
bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.run

## make docs: regenerate the documents generated from the pydantic models
docs: $(VENV)/.test
	$(BIN)/python -m ilup_controller.mqtt.docs
	$(BIN)/python -m ilup_controller.mqtt.asyncapi
	$(BIN)/python -m ilup_controller.core.catalogue > docs/alarms.md
	$(BIN)/python -m sim.faults --docs
	$(BIN)/python -m sim.family --docs

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
