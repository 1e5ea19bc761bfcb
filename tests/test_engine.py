"""Engine behaviour on a tiny random checkpoint: batching, seeds, preemption, compilation, stops."""
import dataclasses

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=4)


@pytest.fixture(scope="module")
def llm(random_llama_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ckpt")
    return LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(cache), **ENGINE_ARGS)


def prompts(n, seed=0, lo=3, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 40000, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def test_batched_greedy_equals_one_at_a_time(llm):
    ps = prompts(6)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in ps]
    together = [o.outputs[0].token_ids for o in llm.generate(ps, params)]
    assert together == alone
    assert all(len(t) == 10 for t in together)


def test_seed_reproduces_alone_and_in_a_busy_batch(llm):
    target = prompts(1, seed=5)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([target], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=int(n), ignore_eos=True) for n in (3, 20, 7, 15)]
    busy = llm.generate(prompts(4, seed=9) + [target], others + [seeded])
    assert busy[-1].outputs[0].token_ids == alone
    other_seed = llm.generate([target], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12,
                                                       ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_outputs_differ_and_are_indexed(llm):
    out = llm.generate(prompts(1, seed=3), SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7,
                                                          ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_prefix_cache_hit_gives_identical_output(llm):
    shared = prompts(1, seed=11, lo=30, hi=31)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([shared], params)[0]
    hits_before = llm.engine.kv_cache.stats.hits
    second = llm.generate([shared], params)[0]
    assert llm.engine.kv_cache.stats.hits - hits_before >= 28  # 7 full pages of 4 reused
    assert second.num_cached_tokens >= 28
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_stop_token_ids_and_max_tokens(llm):
    p = prompts(1, seed=2)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    stop_at = free.token_ids[3]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                           stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert free.finish_reason == "length"


def test_output_cut_inside_a_character_keeps_its_bytes(llm):
    """max_tokens ending inside a multi-byte character: the held bytes come out as U+FFFD, as decode() shows
    them, instead of an empty text for tokens the client was charged for (token 111 is a lone UTF-8
    continuation byte in SmolLM2's byte-level vocabulary)."""
    tok = llm.get_tokenizer()
    assert tok.decode([111]) == "\ufffd"
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logit_bias={111: 100.0})
    out = llm.generate([prompts(1, seed=5)[0]], params)[0].outputs[0]
    assert out.token_ids == [111, 111, 111] and out.finish_reason == "length"
    assert out.text == tok.decode([111, 111, 111]) == "\ufffd" * 3


def test_logprobs_are_consistent(llm):
    out = llm.generate(prompts(1, seed=4), SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                          ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, position in zip(out.token_ids, out.logprobs):
        assert position[tok].rank == 1  # greedy picks the top token
        values = sorted((lp.logprob for lp in position.values()), reverse=True)
        assert values[0] == pytest.approx(position[tok].logprob)
        assert len(position) == 3 and all(v <= 0 for v in values)


def test_prompt_logprobs_cover_every_prompt_token(llm):
    p = prompts(1, seed=6, lo=20, hi=21)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    assert len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
    for tok, position in zip(p[1:], out.prompt_logprobs[1:]):
        assert tok in position and position[tok].logprob <= 0


def test_invalid_requests_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="maximum context length is 256"):
        llm.generate(["hi"], SamplingParams(max_tokens=1000))
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(["hi"], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())


@pytest.fixture(scope="module")
def async_llm(random_llama_dir, tmp_path_factory):
    """Async scheduling (on by default on accelerators, off on the CPU) forced on; speculation off unless a
    test turns it on (a greedy request that may draft steps one at a time)."""
    cache = tmp_path_factory.mktemp("ckpt")
    return LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(cache), async_scheduling=True,
               num_speculative_tokens=0, **ENGINE_ARGS)


def recording_reads(engine) -> list[bool]:
    """Records, per dispatched step, whether it read a token from the step in flight (on the device)."""
    reads, execute = [], engine.runner.execute

    def recording(step, previous_tokens=None):
        reads.append(step.reads_previous)
        return execute(step, previous_tokens)

    engine.runner.execute = recording
    return reads


def assert_same_outputs(got, want):
    for g, w in zip(got, want, strict=True):
        assert [(c.token_ids, c.finish_reason, c.stop_reason) for c in g.outputs] == \
            [(c.token_ids, c.finish_reason, c.stop_reason) for c in w.outputs]
        for gc, wc in zip(g.outputs, w.outputs):
            assert (gc.logprobs is None) == (wc.logprobs is None)
            for a, b in zip(gc.logprobs or [], wc.logprobs or []):
                assert a.keys() == b.keys()
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)


def test_async_scheduling_gives_the_one_step_at_a_time_outputs(llm, async_llm):
    """With a step in flight while the host reads the last one, every request gets exactly the tokens,
    logprobs and finish reasons of one-step-at-a-time scheduling: greedy and seeded, n=2, max_tokens 1 and 2
    (whose last token is known not to go on), a stop token found late, min_tokens, logprobs, and a request
    with penalties, during which steps go one at a time."""
    assert not llm.engine.config.async_scheduling  # the CPU's default
    ps = prompts(8, seed=21)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    stop_at = llm.generate([ps[2]], greedy)[0].outputs[0].token_ids[5]
    params = [greedy,
              SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]),
              SamplingParams(temperature=1.0, n=2, seed=5, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1),
              SamplingParams(temperature=0.8, seed=8, max_tokens=2, logprobs=3),
              SamplingParams(temperature=0.7, seed=9, max_tokens=10, min_tokens=6, logprobs=2),
              SamplingParams(temperature=0.7, seed=10, max_tokens=10, ignore_eos=True, presence_penalty=0.5)]
    reads = recording_reads(async_llm.engine)
    try:
        got = async_llm.generate(ps, params)
        with_penalty = len(reads)
        got_alone = async_llm.generate(ps[:7], params[:7])  # without the penalty request: overlapped throughout
    finally:
        del async_llm.engine.runner.execute
    want, want_alone = llm.generate(ps, params), llm.generate(ps[:7], params[:7])
    assert_same_outputs(got + got_alone, want + want_alone)
    assert got[2].outputs[0].finish_reason == "stop" and len(got[4].outputs[0].token_ids) == 1
    # the run with the penalty request overlapped only once it had finished
    assert sum(reads[with_penalty:]) > 10 and sum(reads[:with_penalty]) < sum(reads[with_penalty:])
    assert not any(seq.num_pending_tokens for state in async_llm.engine.requests.values() for seq in state.seqs)
    assert not async_llm.engine._steps_on_host  # the penalty request's hold on overlapping ended with it


def test_async_scheduling_survives_an_abort_with_a_step_in_flight(llm, async_llm):
    """Aborting a request whose next token is in flight frees its pages at once; the step's token is dropped
    when read, and the other requests get the tokens of one step at a time."""
    engine = async_llm.engine
    ps = prompts(3, seed=31)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for i, p in enumerate(ps):
        engine.add_request(f"abort-{i}", p, params)
    while not engine._in_flight or not engine._in_flight.pending_rows:
        engine.step()
    victim = engine.requests["abort-1"].seqs[0]
    assert victim.num_pending_tokens == 1
    assert engine.abort_request("abort-1").finished and not victim.pages
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert "abort-1" not in outputs and victim.num_pending_tokens == 0 and engine._in_flight is None
    want = llm.generate([ps[0], ps[2]], params)
    assert [outputs["abort-0"], outputs["abort-2"]] == [w.outputs[0].token_ids for w in want]


def test_async_scheduling_steps_greedy_drafters_one_at_a_time(llm, async_llm):
    """With speculation on, a plain greedy request drafts (its draft starts from its latest token, which must
    be on the host), so steps go one at a time while it runs; sampled requests alone overlap."""
    # prompts that repeat a phrase (the random model's greedy tokens soon repeat themselves too)
    loops = [[101, 102, 103, 104, 105] * 6 + [101, 102], [7001, 7002, 7003] * 9]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True)
    batch, params = loops + prompts(1, seed=2), [greedy, greedy, sampled]
    engine = async_llm.engine
    engine.speculation.config = dataclasses.replace(engine.speculation.config, num_tokens=4)
    reads = recording_reads(engine)
    drafts_before = engine.speculation.draft_tokens_total
    try:
        got = async_llm.generate(batch, params)
        while_greedy = len(reads)
        got_sampled = async_llm.generate(prompts(2, seed=3), sampled)
    finally:
        del engine.runner.execute
        engine.speculation.config = dataclasses.replace(engine.speculation.config, num_tokens=0)
    assert_same_outputs(got + got_sampled, llm.generate(batch, params) + llm.generate(prompts(2, seed=3), sampled))
    assert engine.speculation.draft_tokens_total > drafts_before
    assert not any(reads[:while_greedy]) and sum(reads[while_greedy:]) > 5


def test_bad_words_and_truncated_prompts(llm, async_llm):
    """A bad word's last token never follows the rest of it (one step at a time and with a step in flight,
    where such a request steps on the host); truncate_prompt_tokens keeps the prompt's last tokens."""
    tok = llm.get_tokenizer()
    prompt = prompts(1, seed=31)[0]
    greedy = dict(temperature=0, max_tokens=10, ignore_eos=True)
    base = llm.generate([prompt], SamplingParams(**greedy))[0].outputs[0].token_ids
    word = tok.decode(base[1:3])
    assert tok.encode(word, add_special_tokens=False) == base[1:3]  # the word is these two tokens
    for engine in (llm, async_llm):
        out = engine.generate([prompt], SamplingParams(bad_words=[word], **greedy))[0].outputs[0].token_ids
        assert out[:2] == base[:2] and out[2] != base[2]  # its first token is fine, its second is not
        assert all(pair != tuple(base[1:3]) for pair in zip(out, out[1:]))
    first = tok.decode(base[:1])
    out = llm.generate([prompt], SamplingParams(bad_words=[first], **greedy))[0]
    assert base[0] not in out.outputs[0].token_ids
    assert not async_llm.engine._steps_on_host
    short = llm.generate([prompt], SamplingParams(truncate_prompt_tokens=5, **greedy))[0]
    assert short.prompt_token_ids == prompt[-5:]
    assert short.outputs[0].token_ids == llm.generate([prompt[-5:]], SamplingParams(**greedy))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate([prompt], SamplingParams(truncate_prompt_tokens=1000, **greedy))


def test_priority_policy_serves_lower_priorities_first(random_llama_dir, tmp_path):
    llm = LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(tmp_path), scheduling_policy="priority",
              **dict(ENGINE_ARGS, max_num_seqs=1))
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for request_id, priority in (("a", 3), ("b", 0), ("c", -2)):
        eng.add_request(request_id, {"prompt_token_ids": prompts(1, seed=priority + 5)[0], "priority": priority},
                        params)
    finished = []
    while eng.has_unfinished_requests():
        finished += [out.request_id for out in eng.step() if out.finished]
    assert finished == ["c", "b", "a"]  # one at a time (max_num_seqs 1), lowest priority value first


def test_priority_needs_the_priority_policy(llm):
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        llm.generate([{"prompt_token_ids": [5, 6, 7], "priority": 1}], SamplingParams(max_tokens=2))
    out = llm.generate([{"prompt_token_ids": [5, 6, 7], "priority": 0}], SamplingParams(max_tokens=2))
    assert len(out[0].outputs[0].token_ids) == 2


def test_cache_salt_keeps_prefix_pages_to_requests_with_the_same_salt(llm):
    shared = prompts(1, seed=12, lo=30, hi=31)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": shared, "cache_salt": "tenant-a"}], params)[0]
    other = llm.generate([{"prompt_token_ids": shared, "cache_salt": "tenant-b"}], params)[0]
    unsalted = llm.generate([shared], params)[0]
    again = llm.generate([{"prompt_token_ids": shared, "cache_salt": "tenant-a"}], params)[0]
    assert (other.num_cached_tokens, unsalted.num_cached_tokens) == (0, 0)
    assert again.num_cached_tokens >= 28  # 7 full pages of 4
    assert first.outputs[0].token_ids == other.outputs[0].token_ids == again.outputs[0].token_ids


def test_preemption_keeps_outputs_exact(random_llama_dir, tmp_path):
    # 24 usable pages of 4 tokens: 4 sequences of ~40 tokens cannot all stay resident.
    small = LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(tmp_path), kv_cache_memory=None,
                **{**ENGINE_ARGS, "max_model_len": 64}, precompile=False)
    per_page = small.engine.runner.kv_bytes_per_page(small.engine.model_config, 4, "float32")
    tight = LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(tmp_path), kv_cache_memory=25 * per_page,
                **{**ENGINE_ARGS, "max_model_len": 64}, precompile=False)
    ps = prompts(4, seed=8, lo=10, hi=20)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in small.generate(ps, params)]
    got = [o.outputs[0].token_ids for o in tight.generate(ps, params)]
    assert tight.engine.scheduler.num_preemptions_total > 0
    assert got == want
    assert tight.engine.kv_cache.num_free_pages == tight.engine.kv_cache.num_pages - 1


def test_no_compilation_after_warmup(llm):
    before = llm.engine.stats().num_compilations
    rng = np.random.default_rng(0)
    for request in range(12):
        p = prompts(1, seed=100 + request, lo=1, hi=120)[0]
        llm.engine.add_request(f"mixed-{request}", p, SamplingParams(
            temperature=float(rng.choice([0.0, 0.8])), max_tokens=int(rng.integers(1, 30)), ignore_eos=True))
        for _ in range(int(rng.integers(0, 4))):  # arrivals between steps
            llm.engine.step()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.engine.stats().num_compilations == before


def test_guided_and_unguided_rows_share_a_batch(llm):
    import json
    import re

    from jaxserve import GuidedDecodingParams

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    guided = [GuidedDecodingParams(choice=["red", "green", "blue"]), GuidedDecodingParams(regex="[a-c]{3}-[0-9]{2}"),
              GuidedDecodingParams(json=schema, whitespace_pattern="")]
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ps = prompts(5, seed=21)
    alone = [llm.generate([p], plain)[0].outputs[0].token_ids for p in ps[3:]]
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=40, guided_decoding=g) for i, g in enumerate(guided)]
    outs = llm.generate(ps, params + [plain, plain])
    assert outs[0].outputs[0].text in ("red", "green", "blue")
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", outs[1].outputs[0].text)
    assert 0 <= json.loads(outs[2].outputs[0].text)["n"] <= 99
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:3])
    assert [o.outputs[0].token_ids for o in outs[3:]] == alone


def test_unrolled_and_scanned_decode_steps_agree(llm):
    """Small decode steps run the layers unrolled over per-layer weights; larger ones scan stacked weights."""
    import dataclasses

    runner = llm.engine.runner
    assert runner.config.unroll_decode_max_seqs >= 2  # the CPU default, so the first run below is unrolled
    ps = prompts(2, seed=21)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    unrolled = llm.generate(ps, params)
    config = runner.config
    try:
        runner.config = dataclasses.replace(config, unroll_decode_max_seqs=0)
        runner._step_fns.clear()
        scanned = llm.generate(ps, params)
    finally:
        runner.config = config
        runner._step_fns.clear()
    for a, b in zip(unrolled, scanned):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        np.testing.assert_allclose(a.outputs[0].cumulative_logprob, b.outputs[0].cumulative_logprob, atol=1e-4)


def test_bfloat16_kv_cache_stays_close_to_float32(llm, random_llama_dir, tmp_path):
    import jax.numpy as jnp

    bf16 = LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(tmp_path), kv_cache_dtype="bfloat16",
               precompile=False, **ENGINE_ARGS)
    assert bf16.engine.runner.kv_cache[0].dtype == jnp.bfloat16
    assert llm.engine.runner.kv_cache[0].dtype == jnp.float32
    p = prompts(1, seed=6, lo=30, hi=31)[0]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    want, got = (np.array([next(iter(pos.values())).logprob for pos in out.prompt_logprobs[1:]])
                 for out in (llm.generate([p], params)[0], bf16.generate([p], params)[0]))
    assert not np.array_equal(got, want)  # the cache really is rounded ...
    np.testing.assert_allclose(got, want, atol=0.05)  # ... and the prompt's log-probabilities barely move


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_a_float8_kv_cache_holds_more_pages_and_stays_close(llm, random_llama_dir, tmp_path, kv_cache_dtype):
    """vLLM's --kv-cache-dtype fp8: a quarter of float32's bytes a value, so four times the pages in the same
    budget; the prompt's log-probabilities (read back through the rounded cache) move, but not far."""
    narrow = LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(tmp_path), kv_cache_dtype=kv_cache_dtype,
                 precompile=False, **ENGINE_ARGS)
    runner = narrow.engine.runner
    assert runner.kv_cache[0].dtype.itemsize == 1 and "float8" in runner.kv_cache[0].dtype.name
    assert runner.config.num_pages >= 4 * llm.engine.runner.config.num_pages - 4
    p = prompts(1, seed=6, lo=30, hi=31)[0]
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
    want, got = (out for out in (llm.generate([p], params)[0], narrow.generate([p], params)[0]))
    want_lp, got_lp = (np.array([next(iter(pos.values())).logprob for pos in out.prompt_logprobs[1:]])
                       for out in (want, got))
    moved = np.abs(got_lp - want_lp)
    # Measured on this random model: fp8 (e4m3) mean 0.12 / max 0.64, e5m2 0.15 / 0.42 (bfloat16: under 0.05); a
    # misread format moves them by whole units.
    assert 0 < moved.mean() < 0.25 and moved.max() < 1.5
    assert len(got.outputs[0].token_ids) == 4


def test_auto_dtype_is_bfloat16_weights_with_float32_activations_on_cpu(random_llama_dir):
    import jax.numpy as jnp

    from jaxserve.engine_setup import resolve_dtype, resolve_kv_cache_dtype

    assert resolve_dtype("auto", "float16") == "bfloat16"  # this suite runs on the CPU backend
    assert resolve_dtype("float32", "bfloat16") == "float32"
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int4")
    # The KV cache: bfloat16 on the CPU with 16-bit weights, float32 with float32 ones, else as asked.
    assert resolve_kv_cache_dtype("auto", "bfloat16", "float32", on_cpu=True) == "bfloat16"
    assert resolve_kv_cache_dtype("auto", "float32", "float32", on_cpu=True) == "float32"
    assert resolve_kv_cache_dtype("auto", "bfloat16", "bfloat16", on_cpu=False) == "bfloat16"
    assert resolve_kv_cache_dtype("float32", "bfloat16", "float32", on_cpu=True) == "float32"
    # vLLM's fp8 names: float8 caches (e4m3 unless e5m2 is named)
    assert resolve_kv_cache_dtype("fp8", "bfloat16", "float32", on_cpu=True) == "float8_e4m3fn"
    assert resolve_kv_cache_dtype("fp8_e4m3", "bfloat16", "bfloat16", on_cpu=False) == "float8_e4m3fn"
    assert resolve_kv_cache_dtype("fp8_e5m2", "float32", "float32", on_cpu=True) == "float8_e5m2"
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        resolve_kv_cache_dtype("int4", "bfloat16", "float32", on_cpu=True)
    with pytest.raises(ValueError, match="at least 1"):
        LLM(model=str(random_llama_dir), max_num_seqs=0)
    auto = LLM(model=str(random_llama_dir), checkpoint_cache_dir=None, precompile=False, max_model_len=64,
               block_size=4)
    assert (auto.engine.config.max_num_seqs, auto.engine.config.max_num_batched_tokens) == (64, 512)  # CPU's
    runner = auto.engine.runner
    assert runner.params[0][runner.split.outer_paths.index(("norm", "weight"))].dtype == jnp.bfloat16
    # the embedding: bfloat16, or its bits in block_quant's tiles where the block loops take the weights
    embedding = runner.params[0][0]
    assert embedding.dtype == (jnp.uint16 if runner.config.block_formats else jnp.bfloat16)
    assert runner.kv_cache[0].dtype == jnp.bfloat16
    assert runner.activation_dtype == jnp.float32
    out = auto.generate([prompts(1)[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_the_kv_cache_allocated_ahead_is_zeroed_pages_of_every_layer(llm):
    """On the CPU the KV cache is zeroed in a thread while the weights restore (engine_setup); the runner must
    hold that cache: every layer's pages, zeros before any request wrote to them."""
    from jaxserve.model_runner import allocate_kv_cache

    runner = llm.engine.runner
    k, v = allocate_kv_cache(runner.model_config, runner.config, runner.mesh)
    cfg, rc = runner.model_config, runner.config
    assert k.shape == v.shape == (cfg.num_layers * rc.num_pages, rc.page_size, cfg.num_kv_heads, cfg.head_dim)
    assert not np.asarray(k).any() and not np.asarray(v).any()
    assert [a.shape for a in runner.kv_cache] == [k.shape, v.shape]
    assert [a.dtype for a in runner.kv_cache] == [k.dtype, v.dtype]


def test_a_tokenizer_that_fails_to_load_fails_the_engine(random_llama_dir, tmp_path):
    """The tokenizer loads in a thread beside the weights; its error must still stop the start."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(model=str(random_llama_dir), tokenizer=str(tmp_path / "no-such-tokenizer"),
            checkpoint_cache_dir=str(tmp_path / "ckpt"), **ENGINE_ARGS)


def test_an_accelerators_kv_budget_leaves_room_for_the_weights(monkeypatch):
    """On an accelerator the KV cache takes gpu_memory_utilization of the device's memory less what is in use
    and less the weights, which are placed after the cache is sized (an 8B model's 16 GB would otherwise
    not fit beside a cache sized to 90% of the device)."""
    from jaxserve import engine_setup
    from jaxserve.config import EngineConfig

    class Device:
        def memory_stats(self):
            return {"bytes_limit": 100 * 2**30, "bytes_in_use": 2**30}

    monkeypatch.setattr(engine_setup.jax, "default_backend", lambda: "gpu")
    config = EngineConfig(gpu_memory_utilization=0.9)
    flat = {"embed": np.zeros((1000, 64), np.float32), "proj": np.zeros((64, 64), np.float16)}
    assert engine_setup.weight_bytes(flat) == 1000 * 64 * 4 + 64 * 64 * 2
    assert engine_setup.kv_budget_bytes(config, Device()) == 90 * 2**30 - 2**30
    assert engine_setup.kv_budget_bytes(config, Device(), 16 * 2**30) == 90 * 2**30 - 17 * 2**30
    assert engine_setup.kv_budget_bytes(config, Device(), 200 * 2**30) == 0  # too big: no negative budget
    assert engine_setup.kv_budget_bytes(EngineConfig(kv_cache_memory=2**20), Device(), 16 * 2**30) == 2**20
