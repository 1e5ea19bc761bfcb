# PyTorch/transformers oracle environment (included by the top-level Makefile).
#
# The parity tests compare the JAX engine against Hugging Face transformers on
# CPU.  PyTorch's CPU wheel exists on this machine for CPython 3.11 only, so the
# oracle lives in its own 3.11 venv and the 3.12 test process calls it as a
# subprocess (tests/oracle/client.py).  torch is pinned to the local +cpu
# wheel: an unpinned torch could pull a CUDA build with gigabytes of nvidia-*
# dependencies.  transformers is pinned to the release in the main .venv so
# both sides parse GGUF files and tokenizers with the same code.

ORACLE_VENV   ?= .venv-oracle
ORACLE_STAMP  := $(ORACLE_VENV)/.oracle-installed
# accelerate: transformers requires it to load (dequantise) GGUF checkpoints.
ORACLE_PKGS   ?= torch==2.13.0 transformers==5.24.0 accelerate safetensors gguf numpy sentencepiece tokenizers
# Set ORACLE_PYTHON to skip the search below, e.g. ORACLE_PYTHON=/usr/bin/python3.11.
ORACLE_PYTHON ?=

.PHONY: oracle-venv oracle-venv-clean

oracle-venv: $(ORACLE_STAMP)

# Idempotent: the stamp is written only after a complete install, and depends on this file, so a
# changed package list re-runs pip (into the existing venv: already installed packages are kept,
# which takes seconds).  A venv whose interpreter no longer runs is recreated from scratch.
$(ORACLE_STAMP): mk/oracle.mk
	@if ! $(ORACLE_VENV)/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then \
	  py="$(ORACLE_PYTHON)"; \
	  if [ -z "$$py" ]; then \
	    for cand in "python3.11" "env PYENV_VERSION=3.11.7 python3" "python3"; do \
	      if $$cand -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then \
	        py="$$cand"; break; \
	      fi; \
	    done; \
	  fi; \
	  if [ -z "$$py" ]; then echo "oracle-venv: no Python 3.11 interpreter found (set ORACLE_PYTHON)" >&2; exit 1; fi; \
	  echo "oracle-venv: creating $(ORACLE_VENV) with $$py ($$($$py --version))"; \
	  rm -rf $(ORACLE_VENV) && $$py -m venv $(ORACLE_VENV) || exit 1; \
	fi
	$(ORACLE_VENV)/bin/python -m pip install --quiet $(ORACLE_PKGS)
	@$(ORACLE_VENV)/bin/python -c 'import torch, transformers, accelerate; print("oracle-venv: torch", torch.__version__, "transformers", transformers.__version__)'
	@touch $@

oracle-venv-clean:
	rm -rf $(ORACLE_VENV)
