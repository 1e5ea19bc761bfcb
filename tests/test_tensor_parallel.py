"""Tensor parallelism: partition specs per parameter; TP 1/2/4 on virtual CPU devices, and a two-process
multi-host run on localhost, equal one device.

The engine runs in a subprocess (tensor_parallel_worker.py) because the 8 virtual devices need XLA_FLAGS
before JAX initialises, and this pytest process has already started JAX with one device.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from random_checkpoint import saved_default_tokenizer, write_random_llama  # tests/ is on sys.path (conftest)

from jaxserve.config import ModelConfig
from jaxserve.models.sharding import (kv_cache_partition_spec, param_partition_spec, plan_tensor_parallel,
                                      tensor_parallel_mesh)

TP_SIZES = (1, 2, 4)
LOGPROB_TOL = 1e-4


def tiny_config(heads=4, kv_heads=2, intermediate=128, vocab=1000):
    return ModelConfig("llama", vocab, 64, intermediate, 2, heads, kv_heads, 64 // heads)


def test_megatron_layout_when_everything_divides():
    plan = plan_tensor_parallel(tiny_config(), 2)
    assert plan.reasons == ()
    spec = lambda *path, stacked=True: param_partition_spec(path, plan, stacked)
    for proj in ("q_proj", "k_proj", "v_proj"):  # column-parallel: output features split
        assert spec("self_attn", proj, "kernel") == P(None, None, "model")
        assert spec("self_attn", proj, "bias") == P(None, "model")
    assert spec("mlp", "gate_proj", "kernel") == spec("mlp", "up_proj", "kernel") == P(None, None, "model")
    # Row-parallel: input features split.
    assert spec("self_attn", "o_proj", "kernel") == spec("mlp", "down_proj", "kernel") == P(None, "model", None)
    assert spec("input_layernorm", "weight") == P()
    assert spec("embed_tokens", "embedding", stacked=False) == P("model", None)
    assert spec("lm_head", "kernel", stacked=False) == P(None, "model")
    assert spec("norm", "weight", stacked=False) == P()
    assert kv_cache_partition_spec(plan) == P(None, None, "model", None)


def test_dimensions_the_mesh_does_not_divide_are_replicated_with_a_reason():
    plan = plan_tensor_parallel(tiny_config(heads=6, kv_heads=2, intermediate=96, vocab=1001), 4)
    assert (plan.q_heads, plan.kv_heads, plan.mlp, plan.vocab) == (False, False, True, False)
    assert len(plan.reasons) == 3 and all("replicated" in r for r in plan.reasons)
    assert any(r.startswith("2 KV heads do not split over 4 devices") for r in plan.reasons)
    assert param_partition_spec(("self_attn", "k_proj", "kernel"), plan, True) == P()
    assert param_partition_spec(("self_attn", "o_proj", "kernel"), plan, True) == P()
    assert param_partition_spec(("mlp", "down_proj", "kernel"), plan, True) == P(None, "model", None)
    assert all(axis is None for axis in param_partition_spec(("embed_tokens", "embedding"), plan, False))
    assert kv_cache_partition_spec(plan) == P()


def test_more_devices_than_jax_sees_is_a_clear_error():
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 devices but JAX sees 1"):
        tensor_parallel_mesh(2, jax.devices()[:1])


def max_logprob_gap(a, b):
    gap = 0.0
    for seq_a, seq_b in zip(a, b):
        for pos_a, pos_b in zip(seq_a, seq_b):
            shared = pos_a.keys() & pos_b.keys()
            assert len(shared) >= len(pos_a) - 1  # the same top alternatives (ties at the edge aside)
            gap = max([gap] + [abs(pos_a[t] - pos_b[t]) for t in shared])
    return gap


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tensor_parallel")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    worker = Path(__file__).with_name("tensor_parallel_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(out), ",".join(map(str, TP_SIZES))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("model", ["llama", "qwen2", "qwen3"])
def test_tensor_parallel_matches_one_device(tp_results, model):
    runs = tp_results[model]
    single = runs["1"]
    for tp in TP_SIZES[1:]:
        run = runs[str(tp)]
        assert run["mesh_size"] == tp
        assert run["tokens"] == single["tokens"], tp
        assert max_logprob_gap(single["logprobs"], run["logprobs"]) < LOGPROB_TOL, tp
        assert run["sampled_tokens"] == single["sampled_tokens"], tp  # seeded top-p/top-k/penalties
        assert max_logprob_gap(single["prompt_logprobs"], run["prompt_logprobs"]) < LOGPROB_TOL, tp
        # The weights really are split: embedding rows by vocab (49152 divides by 2 and 4).
        assert run["embed_shard_shape"][0] == single["embed_shard_shape"][0] // tp


def test_pallas_kernel_per_kv_head_shard_matches_one_device(tp_results):
    single, run = tp_results["llama"]["1"], tp_results["llama_pallas_tp2"]
    assert run["attention"] == "pallas" and run["kv_spec"] == [None, None, "model", None]
    assert run["tokens"] == single["tokens"]
    assert max_logprob_gap(single["logprobs"], run["logprobs"]) < LOGPROB_TOL
    assert run["sampled_tokens"] == single["sampled_tokens"]
    assert "all-gather" not in run["collectives"], run["collectives"]  # no device gathers the KV cache


def test_kv_heads_split_when_they_divide_and_replicate_when_not(tp_results):
    llama, qwen = tp_results["llama"], tp_results["qwen2"]
    # Llama has 4 heads / 2 KV heads, [layers*pages, page, kv_heads, head_dim] per device:
    assert llama["2"]["kv_spec"] == [None, None, "model", None]
    assert llama["2"]["kv_shard_shape"][2] == 1 and llama["2"]["q_kernel_shard_shape"][2] == 32
    assert llama["4"]["kv_spec"] == [] and llama["4"]["kv_shard_shape"][2] == 2
    assert llama["4"]["q_kernel_shard_shape"][2] == 16  # query heads still split 4 ways
    # CPU devices share the host's RAM, so the KV budget is the host's: split pages cost the same in all,
    # replicated ones TP times as much.
    assert llama["2"]["num_pages"] == llama["1"]["num_pages"]
    assert llama["4"]["num_pages"] == llama["1"]["num_pages"] // 4
    # Fully split (TP 2): XLA's partitioned step all-reduces after attention and after the MLP (inside the
    # scanned layer body) and after the vocab-split embedding lookup, and gathers nothing: no weight or KV
    # page is ever copied whole to each device.
    assert llama["1"]["collectives"] == {}
    assert llama["2"]["collectives"].get("all-reduce", 0) >= 3
    assert "all-gather" not in llama["2"]["collectives"], llama["2"]["collectives"]
    # Qwen2 has 6 heads: TP 4 replicates the whole attention block.
    assert qwen["4"]["q_kernel_shard_shape"][2] == 48 and qwen["4"]["kv_shard_shape"][2] == 2


def test_sharded_weights_are_read_slice_by_slice(tp_results):
    for model in ("llama", "qwen2"):
        runs = tp_results[model]
        assert runs["1"]["checkpoint_bytes_read"] is None  # one device: whole tensors (and the converted cache)
        for tp in TP_SIZES[1:]:
            read, size = runs[str(tp)]["checkpoint_bytes_read"], runs[str(tp)]["checkpoint_bytes"]
            # Each device reads only its slice of a split weight, so the file is read about once in all
            # (replicated norms and KV projections are small); whole tensors per device would read it tp times.
            assert 0.95 * size < read < 1.5 * size, (model, tp, read, size)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_host_tensor_parallel_matches_one_device(tmp_path):
    """Two processes on localhost, 2 CPU devices each, one 4-way mesh joined by jax.distributed (gloo)."""
    model = write_random_llama(tmp_path / "model", saved_default_tokenizer(tmp_path), heads=8, kv_heads=4)
    worker = [sys.executable, str(Path(__file__).with_name("multihost_worker.py")), str(tmp_path), str(model)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    single = subprocess.run(worker + ["single"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    coordinator = f"127.0.0.1:{free_port()}"
    host_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    hosts = [subprocess.Popen(worker + ["host", str(i), "2", coordinator, "4"], env=host_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in hosts:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
    want = json.loads((tmp_path / "single.json").read_text())
    for i in range(2):
        got = json.loads((tmp_path / f"host{i}.json").read_text())
        assert (got["devices"], got["local"], got["mesh"]) == (4, 2, 4)
        assert got["kv_local_shards"] == 2  # each host holds its 2 devices' KV heads, not the whole cache
        assert got["tokens"] == want["tokens"]
        assert max(abs(a - b) for ga, wa in zip(got["logprobs"], want["logprobs"])
                   for a, b in zip(ga, wa)) < LOGPROB_TOL


def test_two_host_serving_matches_one_process(tmp_path):
    """The real engine across two processes: host 0 runs LLM(...).generate (scheduler, sampler inputs,
    prompt logprobs, precompile) and the other host is `python -m jaxserve` with JAXSERVE_* variables,
    which must replay host 0's steps instead of serving HTTP, and stop when host 0 is done."""
    from multihost_worker import SERVING_FLAGS

    model = write_random_llama(tmp_path / "model", saved_default_tokenizer(tmp_path), heads=8, kv_heads=4)
    worker = [sys.executable, str(Path(__file__).with_name("multihost_worker.py")), str(tmp_path), str(model)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    coordinator = f"127.0.0.1:{free_port()}"
    host_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SERVING_FLAGS.items()]
    follower_env = {**host_env, "JAXSERVE_COORDINATOR": coordinator, "JAXSERVE_NUM_HOSTS": "2",
                    "JAXSERVE_HOST_INDEX": "1"}
    procs = {
        "single": subprocess.Popen(worker + ["llm"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True),
        "leader": subprocess.Popen(worker + ["llm-leader", "2", coordinator, "4"], env=host_env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        "follower": subprocess.Popen(
            [sys.executable, "-m", "jaxserve", "--model", str(model), "--tensor-parallel-size", "4", "--precompile",
             f"--checkpoint-cache-dir={tmp_path / 'ckpt-follower'}", f"--compilation-cache-dir={tmp_path / 'xla-f'}",
             *flags], env=follower_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
    }
    logs = {}
    for name, proc in procs.items():
        _, logs[name] = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, logs[name][-4000:])
    assert "following host 0's steps" in logs["follower"] and "Starting jaxserve" not in logs["follower"]
    assert "host 1: stopped after" in logs["follower"]  # host 0 said stop; the follower did not hang
    want = json.loads((tmp_path / "llm.json").read_text())
    got = json.loads((tmp_path / "llm-leader.json").read_text())
    assert (got["mesh"], got["runner"], want["mesh"]) == (4, "LeaderRunner", 1)
    for g, w in zip(got["requests"], want["requests"], strict=True):
        assert g["tokens"] == w["tokens"]
        assert max_logprob_gap([w["logprobs"]], [g["logprobs"]]) < LOGPROB_TOL
        assert max_logprob_gap([w["prompt_logprobs"]], [g["prompt_logprobs"]]) < LOGPROB_TOL
    assert [len(r["tokens"]) for r in got["requests"]] == [8, 6, 5, 7]
    assert len(got["requests"][0]["logprobs"]) == 8 and len(got["requests"][2]["prompt_logprobs"]) == 2
