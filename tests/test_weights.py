"""Model sources, configs, tokenizers and tensors: tiny HF dirs / GGUF files written here, plus the real default GGUF."""
from __future__ import annotations

import json
import os

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

from jaxserve.config import ModelConfig
from jaxserve.models.gguf_reader import read_gguf_header, undo_rotary_permutation
from jaxserve.models.weights import (
    config_from_hf, generation_defaults, iter_hf_tensors, load_model_config, load_tokenizer, resolve_model_source)

# A tiny Llama: vocab 64, hidden 32, 4 heads of 8, 2 KV heads, 2 layers.
V, H, I, L, NH, NKV = 64, 32, 64, 2, 4, 2
HD = H // NH


def tiny_hf_config(**overrides):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": H,
           "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": NH,
           "num_key_value_heads": NKV, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
           "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": [2, 3]}
    cfg.update(overrides)
    return cfg


def tiny_hf_tensors(seed=0, bias=False, dtype=np.float32, qk_norm=False):
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": (NH * HD, H), p + "self_attn.k_proj.weight": (NKV * HD, H),
              p + "self_attn.v_proj.weight": (NKV * HD, H), p + "self_attn.o_proj.weight": (H, NH * HD),
              p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
              p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
              p + "post_attention_layernorm.weight": (H,)}
        if bias:
            t |= {p + "self_attn.q_proj.bias": (NH * HD,), p + "self_attn.k_proj.bias": (NKV * HD,),
                  p + "self_attn.v_proj.bias": (NKV * HD,)}
        if qk_norm:  # Qwen3: one weight over head_dim for every query head, one for every key head
            t |= {p + "self_attn.q_norm.weight": (HD,), p + "self_attn.k_norm.weight": (HD,)}
    return {name: rng.uniform(-1, 1, shape).astype(dtype) for name, shape in t.items()}


def write_hf_dir(path, config, tensors, shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(path, shard))
        weight_map |= {n: shard for n in part}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


# ----------------------------------------------------------------------------------------------- HF dirs

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_hf_single_file_round_trip(tmp_path, dtype):
    tensors = tiny_hf_tensors(dtype=dtype)
    src = resolve_model_source(write_hf_dir(str(tmp_path / "m"), tiny_hf_config(), tensors))
    assert src.kind == "hf_dir"
    assert [os.path.basename(f) for f in src.files] == ["config.json", "model.safetensors"]
    loaded = dict(iter_hf_tensors(src))
    assert loaded.keys() == tensors.keys()
    for name, arr in loaded.items():
        assert arr.dtype == np.float32 and arr.shape == tensors[name].shape
        np.testing.assert_array_equal(arr, tensors[name].astype(np.float32))


def test_hf_sharded_with_index(tmp_path):
    tensors = tiny_hf_tensors(seed=1)
    src = resolve_model_source(write_hf_dir(str(tmp_path / "m"), tiny_hf_config(), tensors, shards=3))
    basenames = [os.path.basename(f) for f in src.files]
    assert basenames[:2] == ["config.json", "model.safetensors.index.json"]
    assert sum(b.endswith(".safetensors") for b in basenames) == 3
    loaded = dict(iter_hf_tensors(src))
    assert loaded.keys() == tensors.keys()
    for name, arr in loaded.items():
        np.testing.assert_array_equal(arr, tensors[name])


def test_hf_tied_embeddings_drop_lm_head(tmp_path):
    src = resolve_model_source(write_hf_dir(str(tmp_path / "m"), tiny_hf_config(tie_word_embeddings=True),
                                            tiny_hf_tensors()))
    names = {n for n, _ in iter_hf_tensors(src)}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_llama_config_from_hf(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "nested": {"b": [1, 2], "a": 0}}
    write_hf_dir(str(tmp_path / "m"), tiny_hf_config(rope_scaling=scaling), tiny_hf_tensors())
    with open(tmp_path / "m" / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [3, 9]}, f)
    cfg = load_model_config(resolve_model_source(str(tmp_path / "m")))
    assert isinstance(cfg, ModelConfig)
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", V, H, I)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (L, NH, NKV, HD)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-6 and cfg.max_position_embeddings == 128
    assert cfg.eos_token_ids == (2, 3, 9) and cfg.bos_token_id == 1
    assert not cfg.attention_bias and cfg.sliding_window is None and not cfg.tie_word_embeddings
    assert [k for k, _ in cfg.rope_scaling] == sorted(scaling)
    assert cfg.rope_scaling_dict()["nested"] == (("a", 0), ("b", (1, 2)))
    assert cfg.rope_scaling_dict()["factor"] == 8.0
    hash(cfg)  # frozen and hashable, nested values included


def test_generation_config_gives_request_defaults(tmp_path):
    from jaxserve.engine_setup import resolve_default_sampling
    write_hf_dir(str(tmp_path / "m"), tiny_hf_config(), tiny_hf_tensors())
    source = resolve_model_source(str(tmp_path / "m"))
    assert resolve_default_sampling("auto", source) == {}  # no generation_config.json: OpenAI's defaults
    with open(tmp_path / "m" / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [3, 9], "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": None,
                   "max_new_tokens": 50}, f)
    assert generation_defaults(str(tmp_path / "m")) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 50}
    assert resolve_default_sampling("auto", source) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 50}
    assert resolve_default_sampling("vllm", source) == {}
    assert resolve_default_sampling(str(tmp_path / "m"), resolve_model_source(None)) == \
        {"temperature": 0.6, "top_p": 0.9, "max_tokens": 50}
    assert resolve_default_sampling("auto", resolve_model_source(None)) == {}  # the embedded .gguf has none
    with pytest.raises(ValueError, match="generation_config.json"):
        resolve_default_sampling(str(tmp_path), source)
    merged = resolve_default_sampling("auto", source, '{"temperature": 0.2, "max_new_tokens": 8, "top_k": 4}')
    assert merged == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 8, "top_k": 4}
    assert resolve_default_sampling("vllm", source, '{"min_p": 0.1}') == {"min_p": 0.1}
    for bad in ("{not json", "[1]"):
        with pytest.raises(ValueError, match="override-generation-config"):
            resolve_default_sampling("auto", source, bad)


def test_eos_as_int_and_default_head_dim(tmp_path):
    write_hf_dir(str(tmp_path / "m"), tiny_hf_config(eos_token_id=2, head_dim=None,
                                                     rope_scaling={"type": "default"}), tiny_hf_tensors())
    cfg = load_model_config(resolve_model_source(str(tmp_path / "m")))
    assert cfg.eos_token_ids == (2,) and cfg.head_dim == HD and cfg.rope_scaling is None


@pytest.mark.parametrize("use_sliding_window, expected", [(False, None), (True, 4096)])
def test_qwen2_config(tmp_path, use_sliding_window, expected):
    config = tiny_hf_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096,
                            use_sliding_window=use_sliding_window)
    write_hf_dir(str(tmp_path / "m"), config, tiny_hf_tensors(bias=True))
    src = resolve_model_source(str(tmp_path / "m"))
    cfg = load_model_config(src)
    assert cfg.architecture == "qwen2" and cfg.attention_bias and cfg.sliding_window == expected
    assert "model.layers.1.self_attn.k_proj.bias" in dict(iter_hf_tensors(src))


def test_qwen3_config(tmp_path):
    # Qwen3's head_dim is its own (heads x head_dim need not be the hidden size) and it has no q/k/v biases.
    config = tiny_hf_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16,
                            attention_bias=False, sliding_window=None, use_sliding_window=False)
    write_hf_dir(str(tmp_path / "m"), config, tiny_hf_tensors(qk_norm=True))
    src = resolve_model_source(str(tmp_path / "m"))
    cfg = load_model_config(src)
    assert (cfg.architecture, cfg.qk_norm, cfg.head_dim, cfg.attention_bias, cfg.sliding_window) == (
        "qwen3", True, 16, False, None)
    assert "model.layers.1.self_attn.k_norm.weight" in dict(iter_hf_tensors(src))
    assert not config_from_hf(tiny_hf_config()).qk_norm


def test_smollm3_config_says_which_layers_rotate(tmp_path):
    base = dict(architectures=["SmolLM3ForCausalLM"], model_type="smollm3", num_hidden_layers=8)
    write_hf_dir(str(tmp_path / "a"), tiny_hf_config(**base), tiny_hf_tensors())
    cfg = load_model_config(resolve_model_source(str(tmp_path / "a")))  # transformers' default: every 4th NoPE
    assert cfg.architecture == "smollm3" and cfg.rope_layers == (True, True, True, False) * 2
    write_hf_dir(str(tmp_path / "b"), tiny_hf_config(**base, no_rope_layers=[1, 0, 0, 1, 1, 1, 1, 0]),
                 tiny_hf_tensors())
    assert load_model_config(resolve_model_source(str(tmp_path / "b"))).rope_layers == (
        True, False, False, True, True, True, True, False)
    for bad, match in (({"no_rope_layers": [1, 0]}, "2 entries for 8 layers"),
                       ({"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window")):
        write_hf_dir(str(tmp_path / "c"), tiny_hf_config(**base, **bad), tiny_hf_tensors())
        with pytest.raises(ValueError, match=match):
            load_model_config(resolve_model_source(str(tmp_path / "c")))
    assert config_from_hf(tiny_hf_config()).rope_layers is None


def test_mistral_config_keeps_configured_sliding_window(tmp_path):
    config = tiny_hf_config(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64,
                            rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    del config["rope_theta"]
    write_hf_dir(str(tmp_path / "m"), config, tiny_hf_tensors())
    cfg = load_model_config(resolve_model_source(str(tmp_path / "m")))
    assert (cfg.architecture, cfg.sliding_window, cfg.rope_theta, cfg.rope_scaling) == ("mistral", 64, 1e6, None)


def test_unsupported_hf_architecture(tmp_path):
    write_hf_dir(str(tmp_path / "m"), tiny_hf_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                 tiny_hf_tensors())
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*llama, mistral, qwen2"):
        load_model_config(resolve_model_source(str(tmp_path / "m")))


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(str(tmp_path / "a" / "b" / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        resolve_model_source(str(tmp_path / "bin"))


# ----------------------------------------------------------------------------------------------- hub ids

def _fake_hub_cache(cache, repo_id, tensors):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return write_hf_dir(str(repo / "snapshots" / commit), tiny_hf_config(), tensors)


def test_hub_id_resolves_from_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "tiny-org/tiny-llama", tiny_hf_tensors())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so "tiny-org/tiny-llama" is not a local relative path
    src = resolve_model_source("tiny-org/tiny-llama")
    assert src.kind == "hf_dir" and os.path.samefile(src.path, snapshot) and src.name == "tiny-org/tiny-llama"
    assert load_model_config(src).num_layers == L


def test_hub_id_missing_from_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_source("meta-llama/Llama-2-7b-hf")
    msg = str(err.value)
    assert "not in the local Hugging Face cache" in msg and str(tmp_path / "hf" / "hub") in msg
    assert "no network" in msg and "local path" in msg


# ----------------------------------------------------------------------------------------------- GGUF

def llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf.py Q/K permutation, written out as the reference."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_undo_rotary_permutation_on_a_known_tensor():
    # One head of dim 4: HF rows [a0 a1 b0 b1] (rotate halves); llama.cpp stores [a0 b0 a1 b1].
    permuted = np.array([0, 2, 1, 3, 4, 6, 5, 7], dtype=np.float32)
    np.testing.assert_array_equal(undo_rotary_permutation(permuted, n_heads=2), np.arange(8))
    w = np.random.default_rng(0).normal(size=(NH * HD, H)).astype(np.float32)
    np.testing.assert_array_equal(undo_rotary_permutation(llama_cpp_permute(w, NH), NH), w)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm"}
# Quantization per HF tensor (1-D norms stay F32 as in llama.cpp) and the tolerance on uniform(-1, 1) data.
QUANT_FOR = {"embed_tokens": QT.Q8_0, "q_proj": QT.Q4_0, "k_proj": QT.Q4_1, "v_proj": QT.F16,
             "o_proj": QT.BF16, "gate_proj": QT.Q8_0, "up_proj": QT.Q4_0, "down_proj": QT.Q4_1, "lm_head": QT.F32}
ATOL = {QT.F32: 0, QT.F16: 1e-3, QT.BF16: 8e-3, QT.Q8_0: 1e-2, QT.Q4_0: 0.13, QT.Q4_1: 0.07}


def to_gguf_name(hf):
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_GGUF[module]}.{kind}"


def qtype_for(hf_name, arr):
    if arr.ndim == 1:
        return QT.F32
    return next(q for key, q in QUANT_FOR.items() if key in hf_name)


def write_tiny_gguf(path, arch="llama", tensors=None, tied=False, extra_kv=True):
    """A GGUF like llama.cpp's converter writes it: Q/K permuted for llama; returns the HF originals."""
    tensors = dict(tensors if tensors is not None else tiny_hf_tensors(bias=(arch == "qwen2"),
                                                                       qk_norm=(arch == "qwen3")))
    if tied:
        tensors.pop("lm_head.weight")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", L)
    w.add_uint32(f"{arch}.embedding_length", H)
    w.add_uint32(f"{arch}.feed_forward_length", I)
    w.add_uint32(f"{arch}.attention.head_count", NH)
    w.add_uint32(f"{arch}.attention.head_count_kv", NKV)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{arch}.context_length", 256)
    if extra_kv:
        w.add_uint32("tokenizer.ggml.bos_token_id", 1)
        w.add_uint32("tokenizer.ggml.eos_token_id", 2)
        w.add_uint32("tokenizer.ggml.eot_token_id", 5)
        w.add_string("general.name", "tiny")
        w.add_array("general.tags", ["a", "bc"])
    for hf_name, arr in tensors.items():
        data = arr
        if arch == "llama" and ".q_proj." in hf_name:
            data = llama_cpp_permute(arr, NH)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llama_cpp_permute(arr, NKV)
        qtype = qtype_for(hf_name, arr)
        raw = quantize(data, qtype)
        w.add_tensor(to_gguf_name(hf_name), raw, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_tensors_dequantized_and_unpermuted(tmp_path, arch):
    originals = write_tiny_gguf(tmp_path / "tiny.gguf", arch=arch)
    src = resolve_model_source(str(tmp_path / "tiny.gguf"))
    assert src.kind == "gguf" and src.files == (str(tmp_path / "tiny.gguf"),)
    loaded = dict(iter_hf_tensors(src))
    assert loaded.keys() == originals.keys()
    for name, arr in loaded.items():
        qtype = qtype_for(name, originals[name])
        assert arr.dtype == np.float32 and arr.shape == originals[name].shape, name
        np.testing.assert_allclose(arr, originals[name], atol=ATOL[qtype], rtol=0, err_msg=f"{name} {qtype.name}")
        # And exactly what quantize -> dequantize gives for the tensor in HF row order.
        expected = dequantize(quantize(originals[name], qtype), qtype).reshape(arr.shape)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = NH if ".q_proj." in name else NKV
            expected = undo_rotary_permutation(
                dequantize(quantize(llama_cpp_permute(originals[name], heads), qtype), qtype), heads)
        np.testing.assert_array_equal(arr, expected, err_msg=name)


def test_gguf_config(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    cfg = load_model_config(resolve_model_source(str(tmp_path / "tiny.gguf")))
    assert cfg == ModelConfig(architecture="llama", vocab_size=V, hidden_size=H, intermediate_size=I,
                              num_layers=L, num_heads=NH, num_kv_heads=NKV, head_dim=HD, rms_norm_eps=1e-6,
                              rope_theta=500000.0, max_position_embeddings=256, tie_word_embeddings=True,
                              attention_bias=False, bos_token_id=1, eos_token_ids=(2, 5))
    write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    qcfg = load_model_config(resolve_model_source(str(tmp_path / "qwen.gguf")))
    assert qcfg.architecture == "qwen2" and qcfg.attention_bias and not qcfg.tie_word_embeddings
    assert not cfg.qk_norm and not qcfg.qk_norm
    write_tiny_gguf(tmp_path / "qwen3.gguf", arch="qwen3")
    q3 = load_model_config(resolve_model_source(str(tmp_path / "qwen3.gguf")))
    assert (q3.architecture, q3.qk_norm, q3.attention_bias) == ("qwen3", True, False)


def test_unsupported_gguf_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="'gpt2'.*llama, qwen2"):
        load_model_config(resolve_model_source(str(tmp_path / "gpt2.gguf")))


def test_header_parser_agrees_with_gguf_reader(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    ours, ref = read_gguf_header(str(tmp_path / "tiny.gguf")), gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    assert [(t.name, t.shape, t.tensor_type, t.offset) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, t.data_offset) for t in ref.tensors]
    assert ours.metadata["general.name"] == "tiny" and ours.metadata["general.tags"] == ["a", "bc"]
    assert ours.metadata["llama.rope.freq_base"] == ref.fields["llama.rope.freq_base"].contents()


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K])
def test_k_quants_read_like_gguf_dequantize(tmp_path, qtype):
    # gguf cannot quantize K-quants, so write random blocks and compare with its reference dequantizer.
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, size=(8, 2 * type_size), dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    from jaxserve.models.gguf_reader import iter_gguf_hf_tensors
    (name, arr), = iter_gguf_hf_tensors(read_gguf_header(str(tmp_path / "k.gguf")), NH, NKV)
    assert name == "model.layers.0.mlp.up_proj.weight" and arr.shape == (8, 2 * block)
    np.testing.assert_array_equal(arr, dequantize(raw, qtype))


# ----------------------------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def default_source():
    return resolve_model_source(None)


def test_default_model_config(default_source):
    assert default_source.kind == "gguf" and default_source.path.endswith(".gguf")
    cfg = load_model_config(default_source)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama", 30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.head_dim, cfg.intermediate_size) == (49152, 64, 1536)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


def test_default_model_tensors(default_source):
    cfg = load_model_config(default_source)
    kv = cfg.num_kv_heads * cfg.head_dim
    expected = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        expected |= {p + "self_attn.q_proj.weight": (576, 576), p + "self_attn.k_proj.weight": (kv, 576),
                     p + "self_attn.v_proj.weight": (kv, 576), p + "self_attn.o_proj.weight": (576, 576),
                     p + "mlp.gate_proj.weight": (1536, 576), p + "mlp.up_proj.weight": (1536, 576),
                     p + "mlp.down_proj.weight": (576, 1536), p + "input_layernorm.weight": (576,),
                     p + "post_attention_layernorm.weight": (576,)}
    shapes = {}
    for name, arr in iter_hf_tensors(default_source):
        assert arr.dtype == np.float32 and np.isfinite(arr).all(), name
        shapes[name] = arr.shape
    assert shapes == expected


def test_default_model_tokenizer(default_source, tmp_path):
    tok = load_tokenizer(default_source)
    assert tok.is_fast and len(tok) == 49152
    text = "Hello world! JAX serves tokens: 12345."
    ids = tok.encode(text)
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == text  # SmolLM2 adds no BOS
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tok.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # Saved as a HF tokenizer dir, it loads back (chat template included) and overrides the GGUF's.
    tok.save_pretrained(str(tmp_path / "tok"))
    again = load_tokenizer(default_source, tokenizer=str(tmp_path / "tok"))
    assert again.encode(text) == ids and again.chat_template == tok.chat_template


def test_consolidated_mistral_weights_are_ignored_next_to_hf_weights(tmp_path):
    tensors = tiny_hf_tensors()
    write_hf_dir(str(tmp_path / "m"), tiny_hf_config(), tensors)
    save_file({"layers.0.attention.wq.weight": np.zeros((2, 2), np.float32)},
              str(tmp_path / "m" / "consolidated.safetensors"))
    src = resolve_model_source(str(tmp_path / "m"))
    assert not any(os.path.basename(f).startswith("consolidated") for f in src.files)
    assert dict(iter_hf_tensors(src)).keys() == tensors.keys()


def test_sentencepiece_gguf_tokenizer_adds_bos_and_carries_chat_template(tmp_path):
    # A llama.cpp "llama" (sentencepiece BPE) vocabulary: control, byte and normal tokens with scores.
    normal = ["\u2581", "h", "e", "l", "o", "\u2581h", "he", "ll", "\u2581he", "llo", "\u2581hello"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + normal
    token_types = [2, 3, 3] + [6] * 256 + [1] * len(normal)
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", [-float(i) for i in range(len(tokens))])
    w.add_array("tokenizer.ggml.token_type", token_types)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_string("tokenizer.chat_template", template)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    tok = load_tokenizer(resolve_model_source(str(tmp_path / "sp.gguf")))
    ids = tok.encode("hello")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "\u2581hello"]  # no add_bos_token key: BOS by default
    assert tok.decode(ids, skip_special_tokens=True) == "hello"
    assert tok.chat_template == template and tok.eos_token == "</s>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user]hi"


def test_checkpoint_dtype(tmp_path):
    from jaxserve.models.weights import checkpoint_dtype

    write_hf_dir(str(tmp_path / "a"), tiny_hf_config(torch_dtype="bfloat16"), tiny_hf_tensors())
    write_hf_dir(str(tmp_path / "b"), tiny_hf_config(dtype="float16"), tiny_hf_tensors())
    write_hf_dir(str(tmp_path / "c"), tiny_hf_config(), tiny_hf_tensors())
    write_tiny_gguf(tmp_path / "d.gguf")
    got = [checkpoint_dtype(resolve_model_source(str(tmp_path / n))) for n in ("a", "b", "c", "d.gguf")]
    assert got == ["bfloat16", "float16", None, None]
