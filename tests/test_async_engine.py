"""AsyncLLMEngine: streaming deltas, abort ends a waiting stream, bad input fails before queueing."""
import asyncio

import pytest

from jaxserve.async_engine import AsyncLLMEngine
from jaxserve.config import EngineConfig
from jaxserve.sampling_params import RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def engine(random_llama_dir, tmp_path_factory):
    config = EngineConfig(model=str(random_llama_dir), dtype="float32", max_model_len=128, max_num_seqs=4,
                          max_num_batched_tokens=32, block_size=4, precompile=False,
                          checkpoint_cache_dir=str(tmp_path_factory.mktemp("ckpt")))
    eng = AsyncLLMEngine(config)
    yield eng
    eng.shutdown()


def test_delta_stream_concatenates_to_the_final_text(engine):
    async def run():
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        tokens = []
        async for out in engine.generate([5, 6, 7, 8], params, "delta-1"):
            tokens += out.outputs[0].token_ids if out.outputs else []
        final = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
        outs = [o async for o in engine.generate([5, 6, 7, 8], final, "final-1")]
        return tokens, outs

    tokens, outs = asyncio.run(run())
    assert len(outs) == 1 and outs[0].finished and outs[0].outputs[0].token_ids == tokens and len(tokens) == 12


def test_abort_ends_a_waiting_stream(engine):
    async def run():
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        outs = []

        async def consume():
            async for out in engine.generate([9, 10, 11], params, "to-abort"):
                outs.append(out)
                if len(outs) == 2:
                    await engine.abort("to-abort")

        await asyncio.wait_for(consume(), timeout=120)
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert engine.stats().kv_cache_usage == 0.0


def test_invalid_request_raises_before_queueing(engine):
    async def run():
        async for _ in engine.generate("hi", SamplingParams(max_tokens=10_000), "too-long"):
            pass

    with pytest.raises(ValueError, match="maximum context length"):
        asyncio.run(run())
    assert engine.stats().num_waiting == 0


def test_a_step_hands_over_between_its_dispatch_and_its_wait(engine):
    """LLMEngine.step(dispatched=...) calls back after dispatching and before waiting for the tokens: the
    server hands the previous step's outputs to their streams there (AsyncLLMEngine._run)."""
    from jaxserve.engine import LLMEngine

    eng = LLMEngine(engine.config)
    events = []
    launch, collect = eng._launch, eng._collect
    eng._launch = lambda in_flight: events.append("launch") or launch(in_flight)
    eng._collect = lambda launched: events.append("collect") or collect(launched)
    eng.add_request("r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    steps = 0
    while eng.has_unfinished_requests():
        eng.step(dispatched=lambda: events.append("dispatched"))
        steps += 1
    assert steps >= 3 and events == ["launch", "dispatched", "collect"] * steps
