# The README's two commands: `make reproduce` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lofa-installed
SCALE  ?= mini
DEVICE ?= auto

.PHONY: reproduce test setup clean-runs

setup: $(STAMP)

# Reinstall when the pins or the package metadata change. --no-build-isolation uses the venv's own setuptools
# (Python 3.11 venvs ship one), so the editable install needs nothing beyond requirements.txt.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/lofa reproduce --scale $(SCALE) --device $(DEVICE)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean-runs:
	rm -rf runs
