# `make parity` and `make test` set themselves up: they use the active virtualenv, or create .venv.
PYTHON ?= python3
COMPONENT ?= all
DTYPE ?= all
ifdef VIRTUAL_ENV
ENV_DIR := $(VIRTUAL_ENV)
else
ENV_DIR := $(CURDIR)/.venv
endif
PY := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.parity-installed

.PHONY: setup parity test clean-reports

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(ENV_DIR)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	@touch $@

parity: $(STAMP)
	$(PY) -m parity run $(COMPONENT) --dtype $(DTYPE)

test: $(STAMP)
	$(PY) -m pytest -q

clean-reports:
	rm -rf reports/*/
