# The two set-up commands of the README: `make demo` and `make test`. Both create .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# An old birder release, unpacked on its own (no dependencies) for tests against the files it writes itself.
LEGACY_BIRDER := 0.3.3

.PHONY: demo test install clean-venv

install: $(STAMP)

# torch 2.14.1 + torchvision 0.29.1 is the pair birder 0.8.4 imports with on this machine (see pyproject.toml).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test,notebooks]"
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/birder-$(LEGACY_BIRDER) birder==$(LEGACY_BIRDER)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitreg-jax demo

# ruff first (seconds): lint and formatting of the whole tree, as configured in pyproject.toml.
# VITREG_JAX_REQUIRE_BIRDER=1: a missing birder fails the run instead of skipping the parity tests.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	VITREG_JAX_REQUIRE_BIRDER=1 $(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
