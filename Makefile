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

# Runs, then renders the HTML reports and index even when a component fails (exit status kept).
parity: $(STAMP)
	$(PY) -m parity run $(COMPONENT) --dtype $(DTYPE); status=$$?; \
	$(PY) -m parity report --latest reports && exit $$status

# The test suite, then the parity gate over every component with the committed thresholds and baselines.
test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m parity gate --dtype all --junit reports/junit.xml

clean-reports:
	rm -rf reports/*/
