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

.PHONY: setup parity test gate mutation screenshots clean-reports

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(ENV_DIR)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

# Runs every component and writes the reports, HTML and index (also when a component fails).
parity: $(STAMP)
	$(PY) -m parity run $(COMPONENT) --dtype $(DTYPE)

# The test suite; it includes the gate over every component with the committed thresholds and baselines
# (tests/test_baselines.py).
test: $(STAMP)
	$(PY) -m pytest -q

# The gate alone, from the command line, with JUnit XML for CI dashboards.
gate: $(STAMP)
	$(PY) -m parity gate --dtype all --require-baselines --junit reports/junit.xml

# The mutation check of the judging core (hours on 2 cores; not part of `make test`). docs/mutation.md
mutation: $(STAMP)
	@test -x $(ENV_DIR)/bin/mutmut || $(PY) -m pip install --quiet --disable-pip-version-check "mutmut>=3.8,<4"
	PATH=$(ENV_DIR)/bin:$$PATH MUTMUT=$(ENV_DIR)/bin/mutmut bash scripts/mutation_check.sh

# Redraws the README's screenshots (docs/screenshots) in headless Chromium; commit what it writes.
screenshots: $(STAMP)
	PARITY_SCREENSHOTS=docs/screenshots PARITY_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/test_browser.py -k test_screenshots

clean-reports:
	rm -rf reports/*/
