"""Prompt-lookup speculation: drafts from the history, and greedy outputs exactly as without drafts."""
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.sampling_params import GuidedDecodingParams, RequestOutputKind
from jaxserve.models.weights import default_gguf_path
from jaxserve.config import DEFAULT_DRAFT_TOKENS
from jaxserve.speculative import SpeculationConfig, eligible, propose

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=4)


def test_propose_copies_what_followed_the_latest_match():
    history = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(history, 3) == [7, 8, 5]  # the latest earlier [1, 2, 3], not the first
    assert propose(history, 1) == [7]
    # past the end of the history the copy goes on from its own start: the loop's next turn
    assert propose(history, 10) == [7, 8, 5, 1, 2, 3, 7, 8, 5, 1]
    assert propose([4, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]


def test_propose_prefers_the_longest_ngram_and_needs_the_shortest():
    # the last 2 tokens [4, 5] occur twice; the last 3 [3, 4, 5] only at the start
    history = [3, 4, 5, 6, 0, 4, 5, 8, 3, 4, 5]
    assert propose(history, 2) == [6, 0]
    assert propose(history, 2, min_ngram=2, max_ngram=2) == [8, 3]
    assert propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert propose([5, 5], 4) == []  # a 1-gram is below the minimum
    assert propose([1, 2, 1, 2], 0) == []


def test_only_plain_greedy_requests_draft():
    assert eligible(SamplingParams(temperature=0))
    assert eligible(SamplingParams(temperature=0, stop=["x"], max_tokens=5, ignore_eos=True))
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0, logprobs=2),
                   SamplingParams(temperature=0, presence_penalty=0.5),
                   SamplingParams(temperature=0, repetition_penalty=1.2),
                   SamplingParams(temperature=0, logit_bias={5: 1.0}),
                   SamplingParams(temperature=0, min_tokens=3),
                   SamplingParams(temperature=0, allowed_token_ids=[1, 2, 3]),
                   SamplingParams(temperature=0, n=2),
                   SamplingParams(temperature=0, guided_decoding=GuidedDecodingParams(regex="[ab]+"))):
        assert not eligible(params), params


@pytest.fixture(scope="module")
def random_engines(random_llama_dir, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("ckpt"))
    plain = LLM(model=str(random_llama_dir), checkpoint_cache_dir=cache, num_speculative_tokens=0, **ENGINE_ARGS)
    drafting = LLM(model=str(random_llama_dir), checkpoint_cache_dir=cache, num_speculative_tokens=4,
                   **ENGINE_ARGS)
    return plain, drafting


def repetitive_prompts(n, seed=0):
    """Token prompts that repeat a short phrase: the history always has a match to draft from."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        phrase = rng.integers(100, 5000, size=int(rng.integers(2, 6))).tolist()
        out.append(phrase * int(rng.integers(3, 8)) + phrase[: int(rng.integers(0, len(phrase)))])
    return out


def test_rejected_drafts_leave_the_tokens_unchanged(random_engines):
    # A random model does not continue the phrase: its rows reject the drafts (the sequence must still get
    # its real row's token, and its cache must not keep the rejected rows' K/V as its own).
    plain, drafting = random_engines
    prompts = repetitive_prompts(6)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    before = drafting.engine.speculation.draft_tokens_total
    for prompt in prompts:
        assert drafting.generate([prompt], params)[0].outputs[0].token_ids == \
            plain.generate([prompt], params)[0].outputs[0].token_ids
    assert drafting.engine.speculation.draft_tokens_total > before
    together = [o.outputs[0].token_ids for o in drafting.generate(prompts, params)]
    assert together == [o.outputs[0].token_ids for o in plain.generate(prompts, params)]


def test_a_sequences_draft_rows_are_one_attention_query_block(random_engines):
    # The real row and its drafts attend as one block of consecutive positions (the pages read once), while
    # each row keeps its own logits index: the sampler still sees one row per token.
    from jaxserve.model_runner import _layout
    from jaxserve.scheduler import ScheduledSeq
    from jaxserve.sequence import Sequence

    _, drafting = random_engines
    engine = drafting.engine
    greedy = SamplingParams(temperature=0, max_tokens=50)
    first = Sequence(0, "a", 0, [5, 6, 7, 5, 6], greedy, 0.0, 0, output_token_ids=[7])
    second = Sequence(1, "b", 0, [9, 8, 9, 8], greedy, 0.0, 0, output_token_ids=[9])
    for seq in (first, second):
        seq.num_computed_tokens = seq.num_tokens - 1
        assert engine.scheduler.reserve(seq, seq.num_tokens + 2)
    rows = [ScheduledSeq(first, 1), ScheduledSeq(first, 1, draft_index=1, draft_token=5),
            ScheduledSeq(first, 1, draft_index=2, draft_token=6), ScheduledSeq(second, 1)]
    try:
        step = engine.runner.prepare(rows)
    finally:
        for seq in (first, second):
            engine.kv_cache.free(seq.pages)
    field = {name: step.packed[o:o + n] for name, (o, n) in _layout(step.shape, engine.runner.config.pages_per_seq).items()}
    assert field["num_seqs"][0] == 2
    assert field["cu_q_lens"][:3].tolist() == [0, 3, 4] and field["kv_lens"][:2].tolist() == [8, 5]
    assert field["positions"][:4].tolist() == [5, 6, 7, 4] and field["token_ids"][:4].tolist() == [7, 5, 6, 9]
    assert field["logits_indices"][:4].tolist() == [0, 1, 2, 3] and step.sample_rows == [0, 1, 2, 3]
    pages = field["page_indices"].reshape(step.shape.num_seqs, -1)
    assert pages[0, :len(first.pages)].tolist() == first.pages and pages[1, :len(second.pages)].tolist() == second.pages


def test_sampled_and_large_steps_do_not_draft(random_engines):
    _, drafting = random_engines
    spec = drafting.engine.speculation
    before = spec.draft_tokens_total
    drafting.generate(repetitive_prompts(2, seed=7), SamplingParams(temperature=0.8, seed=1, max_tokens=12))
    drafting.generate(repetitive_prompts(8, seed=8), SamplingParams(temperature=0, max_tokens=12))  # 8 rows
    assert spec.draft_tokens_total == before


# The default model continues a list of random words by looping over a phrase: prompt lookup's drafts are
# then mostly right. Its bfloat16 projections and attention give a row the same sums in any step, so the
# tokens must be exactly those of one token a step.
WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government").split()


@pytest.fixture(scope="module")
def smol():
    return LLM(model=default_gguf_path(), max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64)


def word_prompts(n, seed=0, length=48):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=length)).capitalize() for _ in range(n)]


def with_drafts(llm, num_tokens, fn):
    engine = llm.engine
    saved = engine.speculation.config
    engine.speculation.config = SpeculationConfig(num_tokens, saved.max_rows)
    try:
        return fn()
    finally:
        engine.speculation.config = saved


def test_greedy_tokens_are_those_of_one_token_a_step(smol):
    spec = smol.engine.speculation
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = word_prompts(3)
    want = with_drafts(smol, 0, lambda: [smol.generate([p], params)[0].outputs[0] for p in prompts])
    accepted = spec.accepted_tokens_total
    got = [smol.generate([p], params)[0].outputs[0] for p in prompts]
    assert spec.accepted_tokens_total - accepted > 20  # most steps kept several tokens
    stats = smol.engine.stats()  # as /metrics reports them
    assert (stats.spec_draft_tokens_total, stats.spec_accepted_tokens_total) == \
        (spec.draft_tokens_total, spec.accepted_tokens_total)
    for g, w in zip(got, want):
        assert (g.token_ids, g.text) == (w.token_ids, w.text)
        assert g.cumulative_logprob is None and w.cumulative_logprob is None  # no logprobs asked for: none kept
    together = [o.outputs[0].token_ids for o in smol.generate(prompts, params)]  # 3 rows + drafts
    assert together == [w.token_ids for w in want]


def test_stops_inside_an_accepted_draft_end_the_output_there(smol):
    prompt = word_prompts(1, seed=3)[0]
    free = with_drafts(smol, 0, lambda: smol.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0])
    for params in (SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[free.token_ids[21]]),
                   SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[free.text[-9:-5]])):
        want = with_drafts(smol, 0, lambda: smol.generate([prompt], params)[0].outputs[0])
        got = smol.generate([prompt], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason)


def test_streams_get_one_output_per_token(smol):
    engine = smol.engine
    accepted = engine.speculation.accepted_tokens_total
    engine.add_request("stream", word_prompts(1, seed=5)[0], SamplingParams(
        temperature=0, max_tokens=32, ignore_eos=True, output_kind=RequestOutputKind.DELTA))
    pieces, steps = [], 0
    while engine.has_unfinished_requests():
        pieces += [o.outputs[0].token_ids for o in engine.step() if o.request_id == "stream"]
        steps += 1
        # kept drafts' K/V count as computed: the next step is a decode step again, not a recompute
        assert all(seq.num_computed_tokens == seq.num_tokens - 1 for seq in engine.scheduler.running)
    assert engine.speculation.accepted_tokens_total > accepted and steps < 32  # steps kept several tokens
    assert [len(p) for p in pieces] == [1] * 32


def test_spare_rows_are_shared_round_the_drafting_sequences():
    from jaxserve.kv_cache_manager import KVCacheManager
    from jaxserve.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
    from jaxserve.sequence import Sequence
    from jaxserve.speculative import PromptLookup

    scheduler = Scheduler(SchedulerConfig(8, 64, 256), KVCacheManager(64, 4, False))
    greedy = SamplingParams(temperature=0, max_tokens=50)
    histories = [[7, 8, 9] * 5, [1, 2, 3, 4, 5] * 3, [30, 31] * 6, [40, 41, 42, 43]]  # the last has no match
    params = [greedy, greedy, greedy, greedy]
    scheduled = []
    for i, (history, p) in enumerate(zip(histories, params)):
        seq = Sequence(i, f"r{i}", 0, history[:-1], p, 0.0, 0, output_token_ids=history[-1:])
        seq.num_computed_tokens = len(history) - 1  # decoding: the last token is this step's input
        assert scheduler.reserve(seq, len(history))
        scheduled.append(ScheduledSeq(seq, 1))
    lookup = PromptLookup(SpeculationConfig(num_tokens=4, max_rows=8), max_model_len=256)
    rows, drafts = lookup.add_drafts(scheduled, scheduler)
    # 4 spare rows over three sequences with drafts: 2, 1, 1 (dealt in turn), none for the fourth; each
    # sequence's draft rows right after its real row (keyed by the real row's index in the step)
    assert {row: d.tokens for row, d in drafts.items()} == {0: [7, 8], 3: [1], 5: [30]}
    assert len(rows) == 8 and [rows[i] for i in (0, 3, 5, 7)] == scheduled
    assert [(r.seq.seq_id, r.draft_index, r.draft_token) for r in rows] == \
        [(0, 0, -1), (0, 1, 7), (0, 2, 8), (1, 0, -1), (1, 1, 1), (2, 0, -1), (2, 1, 30), (3, 0, -1)]
    assert drafts[0].rows == [1, 2] and drafts[3].rows == [4] and drafts[5].rows == [6]
    # every draft row's position has a page
    assert all(len(rows[i].seq.pages) * 4 >= rows[i].seq.num_tokens + len(d.tokens) for i, d in drafts.items())
    # a sequence whose last draft missed drafts one token; a sampled one none
    scheduled[0].seq.extra["draft_limit"] = 1
    scheduled[1].seq.sampling_params = SamplingParams(temperature=0.5)
    rows, drafts = lookup.add_drafts(scheduled, scheduler)
    assert {row: d.tokens for row, d in drafts.items()} == {0: [7], 3: [30, 31, 30]}
    # drafts leave a page per running sequence free: with the pool nearly full, none
    tight = Scheduler(SchedulerConfig(8, 64, 256), KVCacheManager(6, 4, False))
    seq = Sequence(9, "r9", 0, [5, 6, 7, 5, 6], greedy, 0.0, 0, output_token_ids=[7])
    seq.num_computed_tokens = 5
    assert tight.reserve(seq, 6)
    tight.running.extend([seq, seq, seq])  # three running sequences: three pages must stay free
    assert tight.kv_cache.num_free_pages == 3
    rows, drafts = lookup.add_drafts([ScheduledSeq(seq, 1)], tight)  # 4 drafts need a third page
    assert drafts == {} and len(seq.pages) == 2
    tight.running.clear()
    rows, drafts = lookup.add_drafts([ScheduledSeq(seq, 1)], tight)
    assert drafts[0].tokens == [5, 6, 7, 5] and len(seq.pages) == 3
    # past cheap_context only a sequence with a good record drafts
    lookup.config = SpeculationConfig(num_tokens=4, max_rows=8, cheap_context=10)
    scheduled[2].seq.extra["draft_hit_rate"] = 0.9
    rows, drafts = lookup.add_drafts(scheduled, scheduler)
    assert {row: d.tokens for row, d in drafts.items()} == {2: [30, 31, 30, 31]}


def test_flags_and_vllms_speculative_config(capsys):
    from jaxserve.config import EngineConfig
    from jaxserve.server.args import build_parser, configs_from_args

    def config(*argv):
        return configs_from_args(build_parser().parse_args(list(argv)))[0]

    assert config().num_speculative_tokens is None and config("--num-speculative-tokens", "0").num_speculative_tokens == 0
    # the platform's default: drafts without async scheduling (the CPU), none with it (accelerators)
    assert config().with_platform_defaults("cpu").num_speculative_tokens == DEFAULT_DRAFT_TOKENS == 8
    gpu = config().with_platform_defaults("gpu")
    assert gpu.async_scheduling and gpu.num_speculative_tokens == 0
    assert config("--no-async-scheduling").with_platform_defaults("gpu").num_speculative_tokens == 8
    assert config("--tensor-parallel-size", "2").with_platform_defaults("gpu").async_scheduling is False
    # asking for speculation turns it on even with async scheduling
    assert config("--speculative-config", '{"method": "ngram"}').with_platform_defaults("gpu").num_speculative_tokens == 8
    assert config("--async-scheduling", "--num-speculative-tokens", "2").with_platform_defaults("cpu") \
        .num_speculative_tokens == 2
    vllm_form = config("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
                                               '"prompt_lookup_max": 5, "prompt_lookup_min": 3}')
    assert (vllm_form.num_speculative_tokens, vllm_form.prompt_lookup_min, vllm_form.prompt_lookup_max) == (3, 3, 5)
    assert config().replace(num_speculative_tokens=3, prompt_lookup_min=3, prompt_lookup_max=5) == vllm_form
    assert config("--speculative-config", '{"method": "ngram"}').num_speculative_tokens == 8
    assert isinstance(vllm_form, EngineConfig)
    for bad, says in (('{"method": "eagle", "model": "x"}', "only"), ("[1]", "JSON object"), ("{", "not JSON"),
                      ('{"num_speculative_tokens": -1}', "non-negative"), ('{"draft_model": "x"}', "unsupported")):
        with pytest.raises(SystemExit):
            config("--speculative-config", bad)
        assert says in capsys.readouterr().err


def test_steps_with_prompt_chunks_draft_within_their_token_budget():
    from jaxserve.kv_cache_manager import KVCacheManager
    from jaxserve.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
    from jaxserve.sequence import Sequence
    from jaxserve.speculative import PromptLookup

    scheduler = Scheduler(SchedulerConfig(8, 20, 256), KVCacheManager(64, 4, False))
    greedy = SamplingParams(temperature=0, max_tokens=50)
    decoding = Sequence(0, "d", 0, [7, 8, 9] * 4, greedy, 0.0, 0, output_token_ids=[7])
    decoding.num_computed_tokens = 12
    prompt = Sequence(1, "p", 0, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1], greedy, 0.0, 0)
    assert scheduler.reserve(decoding, 13) and scheduler.reserve(prompt, 16)
    scheduled = [ScheduledSeq(prompt, 16), ScheduledSeq(decoding, 1)]  # 17 of the step's 20 tokens
    lookup = PromptLookup(SpeculationConfig(num_tokens=4, max_rows=8), max_model_len=256)
    rows, drafts = lookup.add_drafts(scheduled, scheduler)
    assert list(drafts) == [1] and drafts[1].tokens == [8, 9, 7]  # the prompt chunk drafts nothing; 3 tokens left
    assert [(r.seq.seq_id, r.draft_index) for r in rows[2:]] == [(0, 1), (0, 2), (0, 3)]
    full = [ScheduledSeq(prompt, 16), ScheduledSeq(decoding, 1)]
    scheduler.config = SchedulerConfig(8, 17, 256)
    assert lookup.add_drafts(full, scheduler) == (full, {})  # no token left in the budget


def test_decode_steps_draft_past_max_num_seqs_and_mixed_steps_do_not():
    from jaxserve.kv_cache_manager import KVCacheManager
    from jaxserve.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
    from jaxserve.sequence import Sequence
    from jaxserve.speculative import PromptLookup

    scheduler = Scheduler(SchedulerConfig(4, 64, 256), KVCacheManager(64, 4, False))  # max_num_seqs 4
    greedy = SamplingParams(temperature=0, max_tokens=50)
    decoding = []
    for i in range(3):
        seq = Sequence(i, f"d{i}", 0, [7, 8, 9] * 4, greedy, 0.0, 0, output_token_ids=[7])
        seq.num_computed_tokens = 12
        seq.extra["draft_hit_rate"] = 0.9  # reliable: past cheap_rows too
        assert scheduler.reserve(seq, 13)
        decoding.append(ScheduledSeq(seq, 1))
    lookup = PromptLookup(SpeculationConfig(num_tokens=2, max_rows=16), max_model_len=256)
    rows, drafts = lookup.add_drafts(decoding, scheduler)
    assert len(rows) == 9 and all(len(d.tokens) == 2 for d in drafts.values())  # 9 rows > max_num_seqs
    prompt = Sequence(9, "p", 0, [1, 2, 3, 4], greedy, 0.0, 0)
    assert scheduler.reserve(prompt, 4)
    rows, drafts = lookup.add_drafts([ScheduledSeq(prompt, 4)] + decoding, scheduler)
    assert len(rows) == 4 and drafts == {}  # with a prompt chunk: max_num_seqs rows, none left to draft


def test_arrivals_between_steps_keep_the_tokens(smol):
    # prompts arrive while others decode: steps carry prompt chunks and decode rows with drafts together
    engine = smol.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = word_prompts(4, seed=11)
    want = with_drafts(smol, 0, lambda: [smol.generate([p], params)[0].outputs[0].token_ids for p in prompts])
    drafted = engine.speculation.draft_tokens_total
    got = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"late-{i}", prompt, params)
        for _ in range(3):
            for out in engine.step():
                got[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] = out.outputs[0].token_ids
    assert [got[f"late-{i}"] for i in range(4)] == want
    assert engine.speculation.draft_tokens_total > drafted


def test_plain_greedy_tokens_are_those_the_logits_give(smol):
    """Greedy requests that need no logprob take their tokens from the LM head's kernel where it gives them (AMX
    CPUs: block_quant.matmul's argmax, no logits written) and carry no cumulative_logprob, as vLLM; with logprobs
    (the logits and the sampler) the tokens are the same."""
    prompts = word_prompts(4, seed=9)
    plain = smol.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    scored = smol.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0))
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in scored]
    assert all(o.outputs[0].cumulative_logprob is None for o in plain)
    assert all(o.outputs[0].cumulative_logprob < 0 for o in scored)
