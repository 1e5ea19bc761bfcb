"""vLLM's `vllm serve` flags that mean nothing here, or only one thing: accepted so that a command line (or a
launcher) written for vLLM starts jaxserve too. Each one given is named in a start-up warning; a value this
engine cannot honour (pipeline parallelism, a pooling task) stops the start with the reason.
"""
from __future__ import annotations

import argparse
import os

# Switches with nothing to switch here, and why.
_NOOP_SWITCHES = {
    "enforce_eager": "there are no CUDA graphs to skip: XLA compiles each step shape once",
    "disable_log_stats": "no periodic stats are logged (see /metrics)",
    "disable_frontend_multiprocessing": "the server and the engine share one process",
    "disable_custom_all_reduce": "collectives are XLA's",
    "enable_log_requests": "requests are logged unless --disable-log-requests",
    "calculate_kv_scales": "a float8 KV cache is stored with a scale of 1 (values saturate), none calculated",
}
# Flags with a value that changes nothing here.
_NOOP_VALUES = {
    "swap_space": "preempted sequences are recomputed, not swapped",
    "uvicorn_log_level": "the HTTP server is Sanic; see --log-level",
    "max_seq_len_to_capture": "there are no CUDA graphs",
    "download_dir": "hub ids are read from the local Hugging Face cache (HF_HOME)",
    "revision": "a hub id resolves to the local cache's current snapshot",
    "tokenizer_mode": "the model's own (fast) tokenizer is used",
    "chat_template_content_format": "content parts are joined as text",
    "cpu_offload_gb": "weights stay on the device",
    "max_parallel_loading_workers": "weights load in one pass",
}
_DEVICES = {"cpu": "cpu", "cuda": "cuda", "gpu": "cuda", "tpu": "tpu"}


def add_vllm_compat_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vllm compatibility", "vLLM flags accepted for drop-in command lines "
                                      "(each one given is named in a start-up warning).")
    for name in _NOOP_SWITCHES:
        group.add_argument("--" + name.replace("_", "-"), action="store_true", help=argparse.SUPPRESS)
    for name in _NOOP_VALUES:
        group.add_argument("--" + name.replace("_", "-"), default=None, help=argparse.SUPPRESS)
    group.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                       help="Prompts are always prefilled in chunks under --max-num-batched-tokens.")
    group.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                       help="Only 1: use --tensor-parallel-size / --data-parallel-size.")
    group.add_argument("--task", default="auto", help="auto or generate (the only task served).")
    group.add_argument("--load-format", default="auto", help="auto, safetensors or gguf (read from --model).")
    group.add_argument("--device", default="auto",
                       help="auto (JAX's platform), cpu, cuda or tpu: sets JAX_PLATFORMS unless it is set.")
    group.add_argument("-tp", dest="tensor_parallel_size", type=int, default=argparse.SUPPRESS,
                       help="Short for --tensor-parallel-size.")
    group.add_argument("-dp", dest="data_parallel_size", type=int, default=argparse.SUPPRESS,
                       help="Short for --data-parallel-size.")


def apply_vllm_compat_args(args: argparse.Namespace) -> list[str]:
    """Warnings for the vLLM flags given (raises SystemExit for values this engine cannot honour); --device
    sets JAX_PLATFORMS before JAX starts."""
    values = vars(args)
    if values.get("pipeline_parallel_size", 1) != 1:
        raise SystemExit("error: pipeline parallelism is not supported; use --tensor-parallel-size and "
                         "--data-parallel-size")
    if values.get("task", "auto") not in ("auto", "generate"):
        raise SystemExit(f"error: --task {values['task']}: this server only generates text (auto or generate)")
    if values.get("load_format", "auto") not in ("auto", "safetensors", "gguf"):
        raise SystemExit(f"error: --load-format {values['load_format']}: the weights are read as safetensors "
                         "or GGUF from --model (auto)")
    device = values.get("device", "auto")
    if device != "auto":
        if device not in _DEVICES:
            raise SystemExit(f"error: --device {device}: auto, cpu, cuda or tpu")
        os.environ.setdefault("JAX_PLATFORMS", _DEVICES[device])
    warnings = [f"--{name.replace('_', '-')} is accepted for vLLM command lines and ignored: {why}"
                for name, why in _NOOP_SWITCHES.items() if values.get(name)]
    warnings += [f"--{name.replace('_', '-')} {values[name]} is accepted for vLLM command lines and ignored: {why}"
                 for name, why in _NOOP_VALUES.items() if values.get(name) is not None]
    if values.get("enable_chunked_prefill") is False:
        warnings.append("--no-enable-chunked-prefill is ignored: prompts are always prefilled in chunks of at most "
                        "--max-num-batched-tokens")
    return warnings
