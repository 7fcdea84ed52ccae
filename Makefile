# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv browser iproute2 bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Headless Chromium from Debian for the browser tests (skipped when already present).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# iproute2 (ip, tc) for the multi-host test in network namespaces (skipped when already present).
iproute2:
	@command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || { \
	  echo "installing Debian iproute2 for the multi-host test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; }

demo: $(STAMP)
	$(BIN)/beamkin demo

test: $(STAMP) browser iproute2
	$(BIN)/python -m pytest

# particles (bench_particles.py) resolves to an older NumPy unless the installed one is pinned
bench: $(STAMP)
	$(BIN)/pip install -e '.[test,bench]' "numpy==$$($(BIN)/python -c 'import numpy; print(numpy.__version__)')"
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
