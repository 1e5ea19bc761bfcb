"""Hugging Face transformers (PyTorch, CPU, float32) as the reference for jaxserve's parity tests.

Runs under .venv-oracle (Python 3.11 + torch CPU; see mk/oracle.mk), never in the 3.12 test process:
    .venv-oracle/bin/python tests/oracle/hf_oracle.py < job.json > result.json
stdin holds one job object, or a list of jobs (run in order in one process, sharing loaded models and
tokenizers, which saves the ~3 s torch import and repeated model loads); stdout gets the matching
result object or list.  Arrays travel in wire.py's base64 form.  Any failure: traceback on stderr,
exit status 1.  GGUF conversions are cached on disk when ORACLE_CACHE_DIR is set (gguf_cache.py;
the client sets it to build/oracle-cache).  With --serve it instead answers one request per line until stdin closes (see serve()).

Jobs (model = a HF directory; gguf_file = optional GGUF file name inside it, dequantised by
transformers):
  {"op": "greedy", "model", "gguf_file"?, "prompts": [[ids]], "max_new_tokens": N,
   "stop_token_ids"?: [ids] (default none: always N tokens), "top_k"?: 5,
   "full_logits"?: "first" | "all" | "none" (default "first"), "decode"?: false}
     -> {"results": [{"prompt", "tokens", "finish_reason": "length"|"stop",
                      "top_ids", "top_logits", "top_logprobs": [steps][top_k],
                      "first_logits": [V] (first|all), "logits": [steps, V] (all), "text" (decode)}]}
  {"op": "logits", "model", "gguf_file"?, "prompts": [[ids]]}
     -> {"logits": [[T, V] per prompt]}            (teacher forcing, one forward pass, no cache)
  {"op": "chat_prompt", "model", "gguf_file"?, "messages": [...], "add_generation_prompt"?: true}
     -> {"prompt": [ids], "text": str}
  {"op": "make_tiny", "arch", "out", "seed"?: 0, "tokenizer_from_gguf": path | "tokenizer_from": dir}
     -> summary of the written checkpoint (see tiny_checkpoint.py)
  {"op": "info"} -> {"python", "torch", "transformers"}
"""
from __future__ import annotations

import json
import os
import platform
import sys
import traceback

import numpy as np
import torch
import transformers

from gguf_cache import load_gguf_cached, save_dequantized_model, save_tokenizer
from tiny_checkpoint import make_tiny
from wire import encode_array

NUM_THREADS_ENV = "ORACLE_NUM_THREADS"


class LoadedObjects:
    """Models and tokenizers loaded by this process, keyed by where they came from."""

    def __init__(self) -> None:
        self._models: dict[tuple, torch.nn.Module] = {}
        self._tokenizers: dict[tuple, object] = {}

    def model(self, model_dir: str, gguf_file: str | None) -> torch.nn.Module:
        key = (os.path.abspath(model_dir), gguf_file)
        if key not in self._models:
            def load(source: str, gguf_file: str | None = None) -> torch.nn.Module:
                kwargs = {"gguf_file": gguf_file} if gguf_file else {}
                # eager attention: the plainest float32 math (explicit softmax): the reference.
                return transformers.AutoModelForCausalLM.from_pretrained(
                    source, dtype=torch.float32, attn_implementation="eager", **kwargs)
            if gguf_file:
                model = load_gguf_cached("model", model_dir, gguf_file, load, save_dequantized_model)
            else:
                model = load(model_dir)
            self._models[key] = model.eval()
        return self._models[key]

    def tokenizer(self, model_dir: str, gguf_file: str | None):
        key = (os.path.abspath(model_dir), gguf_file)
        if key not in self._tokenizers:
            load = transformers.AutoTokenizer.from_pretrained
            if gguf_file:
                self._tokenizers[key] = load_gguf_cached("tokenizer", model_dir, gguf_file, load,
                                                         save_tokenizer)
            else:
                self._tokenizers[key] = load(model_dir)
        return self._tokenizers[key]


def _top_k(logits: torch.Tensor, k: int) -> tuple[list[int], list[float], list[float]]:
    logprobs = torch.log_softmax(logits.double(), dim=-1)  # float64: stable logprobs near 0
    values, ids = torch.topk(logits, k)
    return ids.tolist(), values.tolist(), logprobs[ids].tolist()


@torch.no_grad()
def greedy_one(model, prompt: list[int], max_new_tokens: int, stop_ids: set[int], top_k: int,
               full_logits: str) -> dict:
    """Greedy decoding of one prompt with the KV cache (the decode path the engine mirrors)."""
    if not prompt:
        raise ValueError("empty prompt")
    cache = transformers.DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    tokens: list[int] = []
    top_ids, top_logits, top_logprobs, step_logits = [], [], [], []
    finish_reason = "length"
    for step in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        token = int(torch.argmax(logits))  # first maximal index on ties, like numpy/jax argmax
        ids, values, logprobs = _top_k(logits, top_k)
        top_ids.append(ids)
        top_logits.append(values)
        top_logprobs.append(logprobs)
        if full_logits == "all" or (full_logits == "first" and step == 0):
            step_logits.append(logits.numpy().copy())
        tokens.append(token)
        if token in stop_ids:
            finish_reason = "stop"
            break
        if step + 1 < max_new_tokens:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                        use_cache=True)
    result = {"prompt": list(prompt), "tokens": tokens, "finish_reason": finish_reason,
              "top_ids": top_ids, "top_logits": top_logits, "top_logprobs": top_logprobs}
    if step_logits:
        result["first_logits"] = encode_array(step_logits[0])
    if full_logits == "all" and step_logits:
        result["logits"] = encode_array(np.stack(step_logits))
    return result


def run_greedy(job: dict, loaded: LoadedObjects) -> dict:
    full_logits = job.get("full_logits", "first")
    if full_logits not in ("first", "all", "none"):
        raise ValueError(f"full_logits must be first|all|none, got {full_logits!r}")
    model = loaded.model(job["model"], job.get("gguf_file"))
    stop_ids = set(job.get("stop_token_ids") or [])
    results = [greedy_one(model, prompt, int(job["max_new_tokens"]), stop_ids,
                          int(job.get("top_k", 5)), full_logits)
               for prompt in job["prompts"]]
    if job.get("decode"):
        tokenizer = loaded.tokenizer(job["model"], job.get("gguf_file"))
        for result in results:
            result["text"] = tokenizer.decode(result["tokens"])
    return {"results": results}


@torch.no_grad()
def run_logits(job: dict, loaded: LoadedObjects) -> dict:
    model = loaded.model(job["model"], job.get("gguf_file"))
    logits = []
    for prompt in job["prompts"]:
        out = model(input_ids=torch.tensor([prompt]), use_cache=False)
        logits.append(encode_array(out.logits[0].float().numpy()))
    return {"logits": logits}


def run_chat_prompt(job: dict, loaded: LoadedObjects) -> dict:
    tokenizer = loaded.tokenizer(job["model"], job.get("gguf_file"))
    text = tokenizer.apply_chat_template(
        job["messages"], tokenize=False, add_generation_prompt=job.get("add_generation_prompt", True))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"prompt": list(ids), "text": text}


def run_make_tiny(job: dict, loaded: LoadedObjects) -> dict:
    # Converting the GGUF vocabulary takes ~20 s; a tokenizer already saved by an earlier make_tiny
    # ("tokenizer_from": that directory) loads in ~1 s.
    if job.get("tokenizer_from"):
        tokenizer = loaded.tokenizer(job["tokenizer_from"], None)
    else:
        gguf_path = job["tokenizer_from_gguf"]
        tokenizer = loaded.tokenizer(os.path.dirname(gguf_path), os.path.basename(gguf_path))
    return make_tiny(job["arch"], job["out"], int(job.get("seed", 0)), tokenizer)


def run_info(job: dict, loaded: LoadedObjects) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


OPS = {"greedy": run_greedy, "logits": run_logits, "chat_prompt": run_chat_prompt,
       "make_tiny": run_make_tiny, "info": run_info}


def run_job(job: dict, loaded: LoadedObjects) -> dict:
    op = job.get("op")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {sorted(OPS)}")
    return OPS[op](job, loaded)


def _claim_stdout():
    """Keep the real stdout for replies only and send everything else printed (by Python code or
    native libraries writing to fd 1) to stderr, so stray output cannot corrupt the JSON."""
    sys.stdout.flush()
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return replies


def serve(loaded: LoadedObjects, replies) -> int:
    """`--serve`: one JSON request per stdin line, one JSON reply per stdout line, until EOF.

    A test session keeps one such process, paying the torch/transformers import (~6-30 s on this
    shared machine) and each model load once instead of per call.
    """
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = {"ok": True, "result": run_request(json.loads(line), loaded)}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


def run_request(request: dict | list, loaded: LoadedObjects):
    if isinstance(request, list):
        return [run_job(job, loaded) for job in request]
    return run_job(request, loaded)


def main() -> int:
    # One thread by default: the machine's cores are shared, and a fixed count keeps results
    # reproducible run to run.
    torch.set_num_threads(int(os.environ.get(NUM_THREADS_ENV, "1")))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    replies = _claim_stdout()
    loaded = LoadedObjects()
    if "--serve" in sys.argv[1:]:
        return serve(loaded, replies)
    try:
        response = run_request(json.load(sys.stdin), loaded)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    json.dump(response, replies)
    replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
