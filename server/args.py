"""The `jaxserve serve` command line: server flags (vLLM's names) plus one flag per EngineConfig field."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import typing

from jaxserve.config import DEFAULT_DRAFT_TOKENS, KV_CACHE_DTYPES, EngineConfig
from jaxserve.server.reasoning import PARSERS as REASONING_PARSERS
from jaxserve.server.server_config import ServerConfig
from jaxserve.server.vllm_flags import add_vllm_compat_args, apply_vllm_compat_args

logger = logging.getLogger("jaxserve.server")

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_memory_size(text: str) -> int:
    """'4GiB', '512MiB', '1.5GB', '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (use bytes, or e.g. 4GiB, 512MiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _str_list(text: str) -> list[str]:
    """A JSON list (vLLM's form, e.g. '["*"]') or a comma-separated list."""
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}")
        return [str(v) for v in value]
    return [part.strip() for part in text.split(",") if part.strip()]


# Help for the engine flags; any EngineConfig field not listed still gets a flag.
_ENGINE_HELP = {
    "model": "Hugging Face model directory, .gguf file or hub id (in the local HF cache). "
             "Default: the embedded SmolLM2-135M-Instruct.",
    "tokenizer": "Tokenizer directory or hub id, if not the model's own.",
    "dtype": "Weights dtype: auto (bfloat16 on CPU, else the checkpoint's half type), float32, bfloat16, float16. "
             "On CPU the activations stay float32.",
    "kv_cache_dtype": "KV cache dtype: auto (on CPU bfloat16 with 16-bit weights, float32 with float32 ones; "
                      "elsewhere the activations' dtype), float32, bfloat16, float16, or vLLM's fp8 (= fp8_e4m3) and "
                      "fp8_e5m2: one byte a value, saturating casts with a scale of 1.",
    "max_model_len": "Context length (prompt + output tokens). Default: the model's.",
    "seed": "Seed of the engine's random generator.",
    "block_size": "Tokens per KV-cache page.",
    "kv_cache_memory": "Bytes for the KV cache, e.g. 4GiB, 512MiB or a byte count.",
    "gpu_memory_utilization": "Fraction of accelerator memory to use when --kv-cache-memory is unset.",
    "enable_prefix_caching": "Reuse KV pages of shared prompt prefixes.",
    "async_scheduling": "Dispatch each step before the previous step's tokens reach the host (one step in "
                        "flight while the host finishes the last); off: one step at a time. Default: on for "
                        "GPU/TPU, off on the CPU. Greedy requests that may draft (prompt lookup) step one at a time.",
    "max_num_seqs": "Most sequences in one batch. Default: 64 on the CPU, 256 on GPU/TPU.",
    "max_num_batched_tokens": "Most tokens processed in one engine step. Default: 512 on the CPU, 2048 on "
                              "GPU/TPU (at least --max-num-seqs).",
    "max_logprobs": "Most logprobs / top_logprobs a request may ask for.",
    "generation_config": "Sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens) "
                         "for what a request leaves unset: auto = the model folder's generation_config.json, "
                         "vllm = none (OpenAI's defaults), or a folder holding a generation_config.json.",
    "override_generation_config": "A JSON object of generation-config fields merged over --generation-config's "
                                  "defaults, e.g. '{\"temperature\": 0.5, \"max_new_tokens\": 256}'.",
    "scheduling_policy": "fcfs: requests in arrival order; priority: by the requests' priority (lower first), "
                         "then arrival, and the last in that order is preempted when KV pages run out.",
    "quantization": "gguf: keep a .gguf model's Q4_0 / Q4_1 / Q4_K / Q8_0 weights in their blocks and multiply through "
                    "the CPU block kernels (the default for .gguf models on one CPU device with the kernels, "
                    "unless the CPU has AMX int8); w8a8: int8 weights with one scale per output row and int8 "
                    "activations with one per token, both rotated by a blockwise Hadamard transform, in AMX int8 "
                    "tiles (the default for .gguf models on Intel CPUs with AMX, unless --dtype float32); "
                    "none: dequantize GGUF weights to --dtype; int8: round the layers' projection weights to int8 "
                    "with per-column power-of-two scales for the CPU int8 kernel (one CPU device, bfloat16 "
                    "weights).",
    "attention_backend": "Attention implementation: auto (Pallas on GPU/TPU; on the CPU the hand-written decode "
                         "kernel where it builds), pallas, xla, cpu.",
    "tensor_parallel_size": "Devices to shard the model over (Megatron-style tensor parallelism over a JAX "
                            "mesh); with several hosts, all hosts' devices together.",
    "data_parallel_size": "Engine replicas, each on its own tensor_parallel_size devices, behind one server; "
                          "requests go to the least-loaded replica.",
    "distributed_coordinator": "Multi-host: host 0's HOST:PORT for jax.distributed (also JAXSERVE_COORDINATOR); "
                               "the same on every host.",
    "num_hosts": "Multi-host: number of hosts (processes) sharing the mesh (also JAXSERVE_NUM_HOSTS).",
    "host_index": "Multi-host: this host's index (also JAXSERVE_HOST_INDEX). Host 0 serves HTTP and schedules; "
                  "the others only replay its model steps.",
    "compilation_cache_dir": "Persistent XLA compilation cache directory.",
    "checkpoint_cache_dir": "Directory for converted-weights checkpoints.",
    "checkpoint_cache_max_gb": "Disk budget of the converted-weights cache in GiB: the least recently used "
                               "entries go first, a checkpoint larger than the budget is not cached (0: none "
                               "is); -1: no limit.",
    "compilation_cache_max_gb": "Disk budget in GiB of each compiled cache (XLA's, and jaxserve's serialized "
                                "step executables), least recently used first; 0: no compiled cache; -1: no "
                                "limit.",
    "guided_decoding_backend": "Default guided-decoding backend.",
    "precompile": "Compile every bucket before serving (slower start, no compile stalls later).",
    "num_speculative_tokens": "Prompt-lookup speculation for plain greedy requests: up to this many draft tokens "
                              "a step, copied from where the sequence's last tokens occurred before and checked "
                              "in the same step, so a step can keep several tokens (the same tokens: each draft "
                              "token is computed as a decode row of its own); 0 turns it off. Default: "
                              f"{DEFAULT_DRAFT_TOKENS} on the CPU, 0 with async scheduling (GPU/TPU), which a "
                              "drafting request suspends.",
    "speculative_max_rows": "Most rows of a decode step with draft rows (decode steps wider than --max-num-seqs "
                            "get step shapes of their own; steps with prompt chunks stay within --max-num-seqs); "
                            "past 8 rows only sequences whose drafts were mostly right get draft rows.",
    "prompt_lookup_min": "Prompt lookup: the shortest run of last tokens looked up in the history.",
    "prompt_lookup_max": "Prompt lookup: the longest run of last tokens looked up (the longest found wins).",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(annotation: str):
    """Map a dataclass field annotation (a string under `from __future__ import annotations`)."""
    parts = {p.strip() for p in annotation.split("|")} - {"None"}
    if parts == {"bool"}:
        return bool
    if parts == {"int"}:
        return int
    if parts == {"float"}:
        return float
    return str


# Flags of the "distributed" group, and the environment variables that give their defaults (a launcher can
# set them per host instead of templating each host's command line).
_DISTRIBUTED = ("tensor_parallel_size", "data_parallel_size", "distributed_coordinator", "num_hosts", "host_index")
_ENV_DEFAULTS = {"distributed_coordinator": "JAXSERVE_COORDINATOR", "num_hosts": "JAXSERVE_NUM_HOSTS",
                 "host_index": "JAXSERVE_HOST_INDEX"}
_NOT_FLAGS = ("data_parallel_rank",)  # set per replica by the data-parallel router


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine", "Model, memory and batching (EngineConfig).")
    distributed = parser.add_argument_group(
        "distributed", "Tensor / data parallelism and multi-host serving (jax.distributed).")
    engine.add_argument("--speculative-config", type=_speculative_config, default=None, metavar="JSON",
                        help="vLLM's form of the prompt-lookup flags, e.g. '{\"method\": \"ngram\", "
                             "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}'.")
    for f in dataclasses.fields(EngineConfig):
        if f.name in _NOT_FLAGS:
            continue
        group = distributed if f.name in _DISTRIBUTED else engine
        help_text = _ENGINE_HELP.get(f.name, f.name.replace("_", " ") + ".")
        kind = _value_type(f.type if isinstance(f.type, str) else str(f.type))
        default = f.default if f.default is not dataclasses.MISSING else None
        if os.environ.get(_ENV_DEFAULTS.get(f.name, "")):
            # argparse converts a string default with the flag's type: a bad variable fails like a bad flag.
            default = os.environ[_ENV_DEFAULTS[f.name]]
        if not (default is None and "Default:" in help_text):  # platform defaults are spelled out in the help
            help_text += f" (default: {default})"
        if kind is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        elif f.name == "kv_cache_dtype":
            group.add_argument(_flag(f.name), dest=f.name, default=default, choices=("auto", *KV_CACHE_DTYPES),
                               help=help_text)
        elif f.name == "kv_cache_memory":
            group.add_argument(_flag(f.name), dest=f.name, type=parse_memory_size, default=default,
                               metavar="SIZE", help=help_text)
        else:
            group.add_argument(_flag(f.name), dest=f.name, type=kind, default=default,
                               metavar=f.name.upper(), help=help_text)


def _speculative_config(text: str) -> dict:
    """vLLM's --speculative-config as JSON; only its n-gram (prompt lookup) method is built here."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"method\": \"ngram\", ...}'")
    if value.get("method", "ngram") not in ("ngram", "[ngram]"):
        raise argparse.ArgumentTypeError(f"method {value.get('method')!r} is not supported: only \"ngram\" "
                                         "(prompt lookup)")
    known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}
    if set(value) - known:
        raise argparse.ArgumentTypeError(f"unsupported keys {sorted(set(value) - known)}; known: {sorted(known)}")
    for key in known - {"method"}:
        if key in value and (not isinstance(value[key], int) or value[key] < 0):
            raise argparse.ArgumentTypeError(f"{key} must be a non-negative integer, got {value[key]!r}")
    return value


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    net = parser.add_argument_group("server", "Where and how the HTTP server listens.")
    net.add_argument("--host", default=d.host, help=f"Interface to bind (default: {d.host}; 0.0.0.0 for all).")
    net.add_argument("--port", type=int, default=d.port, help=f"Port (default: {d.port}).")
    net.add_argument("--root-path", default=d.root_path, help="URL prefix when served behind a proxy path.")
    net.add_argument("--ssl-keyfile", default=None, help="TLS private key file.")
    net.add_argument("--ssl-certfile", default=None, help="TLS certificate file.")
    net.add_argument("--max-request-bytes", type=parse_memory_size, default=d.max_request_bytes,
                     metavar="SIZE", help="Largest request body accepted; larger ones get 413 (default: 16MiB).")
    api = parser.add_argument_group("api", "What clients see.")
    api.add_argument("--api-key", default=os.environ.get("JAXSERVE_API_KEY"),
                     help="Require 'Authorization: Bearer <key>' (also JAXSERVE_API_KEY).")
    api.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="Model name(s) the API answers to; the first is reported in responses.")
    api.add_argument("--chat-template", default=None,
                     help="Chat template as a Jinja file path or inline Jinja text (overrides the model's).")
    api.add_argument("--response-role", default=d.response_role,
                     help="Role of generated chat messages (default: assistant).")
    api.add_argument("--enable-auto-tool-choice", action="store_true",
                     help='Allow tool_choice "auto" (needs --tool-call-parser).')
    api.add_argument("--tool-call-parser", default=None, help="Parser that extracts tool calls from text.")
    api.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                     help="Split a reasoning model's <think> block from its answer into the chat message's "
                          "reasoning_content.")
    api.add_argument("--enable-prompt-tokens-details", action="store_true",
                     help="usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache served.")
    api.add_argument("--return-tokens-as-token-ids", action="store_true",
                     help='Logprob tokens as "token_id:{id}" (bytes that are not valid UTF-8 stay identifiable).')
    cors = parser.add_argument_group("cors", "Cross-origin requests.")
    cors.add_argument("--allowed-origins", type=_str_list, default=list(d.allowed_origins),
                      help='Allowed origins, JSON list or comma-separated (default: ["*"]).')
    cors.add_argument("--allowed-methods", type=_str_list, default=list(d.allowed_methods),
                      help='Allowed methods (default: ["*"]).')
    cors.add_argument("--allowed-headers", type=_str_list, default=list(d.allowed_headers),
                      help='Allowed headers (default: ["*"]).')
    cors.add_argument("--allow-credentials", action="store_true", help="Allow credentials (cookies).")
    log = parser.add_argument_group("logging")
    log.add_argument("--log-level", default=d.log_level,
                     choices=["debug", "info", "warning", "error", "critical"], help="Log level.")
    log.add_argument("--disable-log-requests", action="store_true", help="Do not log each request.")
    log.add_argument("--max-log-len", type=int, default=None,
                     help="Longest prompt prefix shown in request logs (default: unlimited).")


def build_parser(prog: str = "jaxserve serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a model with an OpenAI-compatible API (Completions and Chat).",
    )
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="The model, as a positional alternative to --model.")
    add_server_args(parser)
    add_engine_args(parser)
    add_vllm_compat_args(parser)
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    from jaxserve.server.chat_template import load_chat_template

    for warning in apply_vllm_compat_args(args):
        logger.warning(warning)
    values = vars(args)
    engine_kwargs = {name: values[name] for name in EngineConfig.field_names() if name in values}
    speculative = values.get("speculative_config")
    if speculative is not None:  # asking for n-gram speculation turns it on whatever the platform's default
        engine_kwargs["num_speculative_tokens"] = DEFAULT_DRAFT_TOKENS
        engine_kwargs.update((key, value) for key, value in speculative.items() if key != "method")
    if values.get("model_tag"):
        if engine_kwargs.get("model") not in (None, values["model_tag"]):
            raise SystemExit("error: give the model either positionally or with --model, not both")
        engine_kwargs["model"] = values["model_tag"]
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("error: --enable-auto-tool-choice needs --tool-call-parser")
    try:
        template = load_chat_template(args.chat_template)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    server = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or None,
        served_model_names=tuple(args.served_model_name or ()), chat_template=template,
        response_role=args.response_role, allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods), allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials, ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile, root_path=args.root_path.rstrip("/"), log_level=args.log_level,
        disable_log_requests=args.disable_log_requests, max_log_len=args.max_log_len,
        enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        max_request_bytes=args.max_request_bytes)
    return EngineConfig(**engine_kwargs), server
