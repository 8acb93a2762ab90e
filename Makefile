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

.PHONY: setup parity test screenshots clean-reports

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(ENV_DIR)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

# Runs, then renders the HTML reports and index even when a component fails (exit status kept).
parity: $(STAMP)
	$(PY) -m parity run $(COMPONENT) --dtype $(DTYPE); status=$$?; \
	$(PY) -m parity report --latest reports && exit $$status

# The test suite, then the parity gate over every component with the committed thresholds and baselines.
test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m parity gate --dtype all --junit reports/junit.xml

# Redraws the README's screenshots (docs/screenshots) in headless Chromium; commit what it writes.
screenshots: $(STAMP)
	PARITY_SCREENSHOTS=docs/screenshots PARITY_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/test_browser.py -k test_screenshots

clean-reports:
	rm -rf reports/*/
