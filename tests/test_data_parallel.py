"""Data parallelism: the router over fake replicas (least-loaded routing, aborts, stats, a dead replica, the
HTTP server in front of it), and two real engine replicas on disjoint virtual CPU devices matching one."""
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import openai
import pytest

from fake_engine import FakeAsyncEngine, load_default_tokenizer
from server_utils import serve_in_process

from jaxserve.config import EngineConfig
from jaxserve.data_parallel import DataParallelEngine
from jaxserve.models.sharding import replica_devices
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.app import build_app
from jaxserve.server.server_config import ServerConfig


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


def router(tokenizer, n=2, step_delay=0.01):
    return DataParallelEngine(EngineConfig(data_parallel_size=n),
                              [FakeAsyncEngine(tokenizer, step_delay=step_delay) for _ in range(n)])


async def collect(engine, request_id, max_tokens=4):
    outs = [o async for o in engine.generate("Hello there", SamplingParams(max_tokens=max_tokens, seed=1),
                                             request_id)]
    return outs[-1]


async def test_concurrent_requests_go_to_the_least_loaded_replica(tokenizer):
    dp = router(tokenizer, n=3)
    outs = await asyncio.gather(*(collect(dp, f"r{i}") for i in range(7)))
    assert all(o.finished for o in outs)
    assert dp.routed == [3, 2, 2] and dp.in_flight == [0, 0, 0]
    assert [len(r.seen_prompts) for r in dp.replicas] == [3, 2, 2]


async def test_one_request_at_a_time_alternates(tokenizer):
    dp = router(tokenizer)
    for i in range(4):
        await collect(dp, f"r{i}")
    assert dp.routed == [2, 2]


async def test_abort_reaches_the_replica_serving_the_request(tokenizer):
    dp = router(tokenizer, step_delay=0.05)
    first = asyncio.create_task(collect(dp, "a", max_tokens=50))
    second = asyncio.create_task(collect(dp, "b", max_tokens=50))
    await asyncio.sleep(0.1)
    with pytest.raises(ValueError, match="already in use"):
        await collect(dp, "b")
    await dp.abort("b")
    await asyncio.wait_for(second, 5)
    assert dp.replicas[1].aborted == ["b"] and dp.replicas[0].aborted == []
    await dp.abort("a")
    await asyncio.wait_for(first, 5)
    assert dp.in_flight == [0, 0]


async def test_a_consumer_that_leaves_closes_the_replica_stream_at_once(tokenizer):
    dp = router(tokenizer, step_delay=0.02)
    stream = dp.generate("Hello there", SamplingParams(max_tokens=100), "gone")
    await anext(stream)
    await stream.aclose()  # the client disconnected
    assert dp.replicas[0].running == set() and dp.in_flight == [0, 0]
    await dp.abort("gone")  # a late abort reaches every replica (a no-op there), not nowhere
    assert [r.aborted for r in dp.replicas] == [["gone"], ["gone"]]


async def test_stats_combine_the_replicas(tokenizer):
    dp = router(tokenizer)
    await asyncio.gather(collect(dp, "a", 3), collect(dp, "b", 5))
    stats = dp.stats()
    assert stats.generation_tokens_total == 8 and stats.num_running == 0


async def test_a_failed_replica_gets_no_more_requests(tokenizer):
    dp = router(tokenizer)
    dp.replicas[0].error = RuntimeError("boom")
    for i in range(3):
        await collect(dp, f"r{i}")
    assert dp.routed == [0, 3] and isinstance(dp.error, RuntimeError)
    dp.replicas[1].error = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="every data-parallel replica stopped"):
        await collect(dp, "last")


async def test_the_server_serves_through_the_router(tokenizer):
    dp = router(tokenizer)
    async with serve_in_process(build_app(dp, ServerConfig())) as url:
        api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        results = await asyncio.gather(*(api.completions.create(model="fake-model", prompt="Hi", max_tokens=5)
                                         for _ in range(4)))
        assert all(r.usage.completion_tokens == 5 for r in results)
        models = await api.models.list()
        assert models.data[0].id == "fake-model"
    assert dp.routed == [2, 2]


def test_replica_device_groups_are_disjoint_and_checked():
    devices = list(range(8))
    assert replica_devices(devices, 2, 1, None) == devices
    assert [replica_devices(devices, 2, 4, r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="data_parallel_rank"):
        replica_devices(devices, 1, 2, None)
    with pytest.raises(ValueError, match=r"data_parallel_size=2 x tensor_parallel_size=2 needs 4 devices but "
                                         r"JAX sees 1"):
        replica_devices(jax.devices()[:1], 2, 2, 0)


def test_two_replicas_match_one_engine_and_share_the_requests(random_llama_dir, tmp_path):
    """Real engines on 8 virtual CPU devices (a subprocess: XLA_FLAGS must precede JAX's start)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    worker = Path(__file__).with_name("data_parallel_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path), str(random_llama_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "results.json").read_text())
    for tp, groups in ((1, [[0], [1]]), (2, [[0, 1], [2, 3]])):  # disjoint device groups
        one, two = result[f"dp1-tp{tp}"], result[f"dp2-tp{tp}"]
        assert two["tokens"] == one["tokens"] and len(one["tokens"]) == 6
        assert two["routed"] == [3, 3] and all(n > 0 for n in two["generated_per_replica"])
        assert two["devices"] == groups
