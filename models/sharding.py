"""Tensor parallelism: where each parameter and the KV cache live on a 1-D device mesh (axis "model").

Megatron-style layout, so each decoder layer needs one all-reduce after attention and one after the MLP
(XLA inserts them when the jitted step runs on sharded inputs; there are no hand-written collectives):
- q/k/v and gate/up projections are column-parallel: their output features (heads / MLP columns) are split;
- o and down projections are row-parallel: their input features are split, the partial sums all-reduced;
- the embedding and the LM head are split by vocabulary row; norms are replicated;
- the KV cache [layers * pages, page_size, kv_heads, head_dim] is split by KV head, like k/v_proj.

A dimension the mesh does not divide is replicated instead (with a logged reason): for example 3 KV heads on
4 devices keeps K/V projections and the whole KV cache on every device, which costs memory but stays exact.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import ModelConfig

logger = logging.getLogger(__name__)

MODEL_AXIS = "model"

# Parameter roles by the NNX path of one decoder layer's module (the stacked layer leaves add a leading
# [num_layers] axis, which is never split).
_COLUMN_PARALLEL = {("self_attn", "q_proj"): "q_heads", ("self_attn", "k_proj"): "kv_heads",
                    ("self_attn", "v_proj"): "kv_heads", ("mlp", "gate_proj"): "mlp", ("mlp", "up_proj"): "mlp"}
_ROW_PARALLEL = {("self_attn", "o_proj"): "q_heads", ("mlp", "down_proj"): "mlp"}


@dataclass(frozen=True)
class TensorParallelPlan:
    """Which model dimensions a mesh of `size` devices splits; the rest are replicated."""

    size: int
    q_heads: bool  # q_proj columns / o_proj rows, by attention head
    kv_heads: bool  # k/v_proj columns and the KV cache, by KV head
    mlp: bool  # gate/up columns / down rows, by intermediate feature
    vocab: bool  # embedding rows / LM head columns
    reasons: tuple[str, ...] = ()  # why a dimension stayed replicated

    def splits(self, group: str) -> bool:
        return getattr(self, group)


def plan_tensor_parallel(cfg: ModelConfig, size: int) -> TensorParallelPlan:
    """Split every dimension `size` divides evenly (heads as whole heads); explain each one that is not
    (the model runner logs the reasons)."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    checks = {"q_heads": (cfg.num_heads, "attention heads"), "kv_heads": (cfg.num_kv_heads, "KV heads"),
              "mlp": (cfg.intermediate_size, "MLP intermediate features"), "vocab": (cfg.vocab_size, "vocabulary")}
    flags, reasons = {}, []
    for group, (count, what) in checks.items():
        flags[group] = size == 1 or count % size == 0
        if not flags[group]:
            reasons.append(f"{count} {what} do not split over {size} devices: replicated")
    return TensorParallelPlan(size, reasons=tuple(reasons), **flags)


def param_partition_spec(path: tuple, plan: TensorParallelPlan, stacked: bool) -> PartitionSpec:
    """The PartitionSpec of one parameter, by its NNX path (`stacked`: it has a leading [num_layers] axis).

    Kernels are nnx.Linear's [in, out]; biases [out]; the embedding [vocab, hidden].
    """
    names = tuple(str(p) for p in path)
    module, leaf = names[:-1], names[-1]
    lead = (None,) if stacked else ()
    axis = MODEL_AXIS
    if module == ("embed_tokens",):
        return PartitionSpec(*lead, axis if plan.vocab else None, None)
    if module == ("lm_head",):
        return PartitionSpec(*lead, None, axis if plan.vocab else None)
    if module in _COLUMN_PARALLEL and plan.splits(_COLUMN_PARALLEL[module]):
        return PartitionSpec(*lead, None, axis) if leaf == "kernel" else PartitionSpec(*lead, axis)
    if module in _ROW_PARALLEL and plan.splits(_ROW_PARALLEL[module]) and leaf == "kernel":
        return PartitionSpec(*lead, axis, None)
    return PartitionSpec()  # norms, row-parallel biases and anything the plan replicates


def kv_cache_partition_spec(plan: TensorParallelPlan) -> PartitionSpec:
    """[layers * pages, page_size, kv_heads, head_dim]: by KV head, like the K/V projections that fill it."""
    return PartitionSpec(None, None, MODEL_AXIS, None) if plan.kv_heads else PartitionSpec()


def tensor_parallel_mesh(size: int, devices: list | None = None) -> Mesh:
    """A 1-D mesh over the first `size` devices (all processes' devices on a multi-host run)."""
    devices = jax.devices() if devices is None else devices
    if size > len(devices):
        raise ValueError(f"tensor_parallel_size={size} needs {size} devices but JAX sees {len(devices)} "
                         f"({devices[0].platform}); on the CPU, XLA_FLAGS=--xla_force_host_platform_device_count"
                         f"={size} before JAX starts gives {size} virtual devices")
    return Mesh(np.array(devices[:size]), (MODEL_AXIS,))


def replica_devices(devices: list, tensor_parallel: int, data_parallel: int, rank: int | None) -> list:
    """Data parallelism: replica `rank` of `data_parallel` owns devices [rank * tp, (rank + 1) * tp), so the
    replicas' meshes are disjoint. With one replica, all devices (the mesh takes the first tp)."""
    if data_parallel < 1:
        raise ValueError(f"data_parallel_size must be at least 1, got {data_parallel}")
    if data_parallel == 1:
        return devices
    if rank is None or not 0 <= rank < data_parallel:
        raise ValueError(f"data_parallel_size={data_parallel} runs one engine per replica behind the server's "
                         f"router (jaxserve.data_parallel); each engine needs data_parallel_rank in "
                         f"[0, {data_parallel}), got {rank}")
    need = data_parallel * tensor_parallel
    if need > len(devices):
        raise ValueError(f"data_parallel_size={data_parallel} x tensor_parallel_size={tensor_parallel} needs {need} "
                         f"devices but JAX sees {len(devices)} ({devices[0].platform}); on the CPU, "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts gives {need}")
    return devices[rank * tensor_parallel:(rank + 1) * tensor_parallel]


def param_shardings(mesh: Mesh, plan: TensorParallelPlan, paths, stacked: bool) -> list[NamedSharding]:
    """One NamedSharding per parameter leaf, in the order of `paths`."""
    return [NamedSharding(mesh, param_partition_spec(p, plan, stacked)) for p in paths]


def place_sharded(arrays: list[np.ndarray], shardings: list[NamedSharding]) -> list[jax.Array]:
    """Host arrays → global device arrays, each device receiving only its own slice.

    On a multi-host mesh every process calls this with the same (possibly memory-mapped) host arrays and
    copies only the slices of its local devices, so no device ever holds a whole split tensor.
    """
    return [jax.make_array_from_callback(a.shape, s, lambda index, a=a: np.asarray(a[index]))
            for a, s in zip(arrays, shardings)]


def initialize_multihost(coordinator: str, num_hosts: int, host_index: int) -> None:
    """Joins this process to a multi-host JAX runtime; jax.devices() then lists every host's devices.

    Must run before anything else touches JAX. On the CPU the cross-process collectives go through gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_hosts, process_id=host_index)
    logger.info("host %d of %d joined %s: %d devices in all, %d local", host_index, num_hosts, coordinator,
                len(jax.devices()), len(jax.local_devices()))
