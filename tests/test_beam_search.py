"""Beam search: the bookkeeping against hand-built next-token tables, then the engine's own beams against its
greedy decoding and its own prompt log-probabilities."""
import math

import pytest

from jaxserve.beam_search import BeamSearch, BeamSearchParams
from jaxserve.outputs import Logprob

EOS = 0


def search_table(table, params, prompt=(5,)):
    """Runs BeamSearch where the next-token distribution after the generated tokens is table[tokens]
    (unlisted prefixes: EOS for certain), handing it the top 2 x width entries as the engine would."""
    search = BeamSearch(list(prompt), params, [EOS])
    while not search.done:
        positions = []
        for beam in search.live:
            dist = table.get(tuple(beam.tokens), {EOS: 1.0})
            ranked = sorted(dist.items(), key=lambda kv: -kv[1])[: 2 * params.beam_width]
            positions.append({t: Logprob(math.log(p), rank=r + 1) for r, (t, p) in enumerate(ranked)})
        search.advance(positions)
    return search


def test_wider_beams_escape_the_greedy_trap():
    # Greedy takes 1 (0.6), then only finds 0.36; 2 (0.4) leads to 6 (0.99).
    table = {(): {1: 0.6, 2: 0.4}, (1,): {3: 0.36, 4: 0.34, 5: 0.30}, (2,): {6: 0.99, 7: 0.01}}
    narrow = search_table(table, BeamSearchParams(beam_width=1, max_tokens=5)).best()
    assert [b.tokens for b in narrow] == [[1, 3, EOS]]
    wide = search_table(table, BeamSearchParams(beam_width=2, max_tokens=5)).best()
    assert [b.tokens for b in wide] == [[2, 6, EOS], [1, 3, EOS]]
    assert wide[0].cumulative_logprob == pytest.approx(math.log(0.4 * 0.99))
    assert all(b.finish_reason == "stop" and b.stop_reason is None for b in wide)


LENGTHS = {(): {8: 0.7, 7: 0.3}, (7,): {EOS: 1.0}, (8,): {9: 0.5, 12: 0.3, 13: 0.2},
           (8, 9): {10: 0.5, 14: 0.3, 15: 0.2}}


@pytest.mark.parametrize("length_penalty,expected", [
    # Finished: [7,E] -1.204 over 2 tokens (prompt + 7), [8,12,E] -1.561 / 3, [8,9,10,E] -1.743 / 4,
    # [8,9,14,E] -2.254 / 4. Without a penalty the short one wins; with 1.0 the per-token average decides.
    (0.0, [[7, EOS], [8, 12, EOS]]),
    (1.0, [[8, 9, 10, EOS], [8, 12, EOS]]),
])
def test_length_penalty_ranks_finished_beams_as_vllm_scores_them(length_penalty, expected):
    search = search_table(LENGTHS, BeamSearchParams(beam_width=2, max_tokens=6, length_penalty=length_penalty))
    best = search.best()
    assert [b.tokens for b in best] == expected
    for beam in best:  # cumulative log-probability / (prompt + generated - final EOS) ** penalty
        length = 1 + len(beam.tokens) - 1
        assert search.score(beam) == pytest.approx(beam.cumulative_logprob / length ** length_penalty)


def test_max_tokens_ends_live_beams_by_length():
    table = {(): {3: 0.5, 4: 0.5}, (3,): {3: 0.9, 4: 0.1}, (4,): {4: 0.8, 3: 0.2}}
    best = search_table(table, BeamSearchParams(beam_width=2, max_tokens=2)).best()
    assert [b.tokens for b in best] == [[3, 3], [4, 4]]
    assert all(b.finish_reason == "length" and len(b.logprobs) == 2 for b in best)


def test_min_tokens_keeps_eos_out_until_reached():
    table = {(): {EOS: 0.9, 3: 0.1}, (3,): {EOS: 0.9, 4: 0.1}}
    assert search_table(table, BeamSearchParams(beam_width=1, max_tokens=4)).best()[0].tokens == [EOS]
    best = search_table(table, BeamSearchParams(beam_width=1, max_tokens=4, min_tokens=2)).best()[0]
    assert best.tokens == [3, EOS] and best.finish_reason == "stop"


def test_early_stopping_ends_once_width_candidates_finished():
    table = {(): {EOS: 0.5, 3: 0.3, 4: 0.2}, (3,): {EOS: 0.6, 5: 0.4}, (4,): {5: 1.0}, (3, 5): {6: 1.0},
             (4, 5): {6: 1.0}}
    params = BeamSearchParams(beam_width=2, max_tokens=6)
    assert search_table(table, params).rounds > 2
    early = search_table(table, BeamSearchParams(beam_width=2, max_tokens=6, early_stopping=True))
    assert early.rounds == 2 and len(early.finished) >= 2


def test_stop_tokens_ignore_eos_and_output_text():
    params = BeamSearchParams(beam_width=1, max_tokens=5, stop_token_ids=(9,), logprobs=0)
    search = search_table({(): {3: 1.0}, (3,): {9: 0.8, EOS: 0.2}}, params)
    out = search.output("r", "p", lambda tokens: ",".join(map(str, tokens))).outputs[0]
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == ([3, 9], "3", "stop", 9)
    assert len(out.logprobs) == 2 and out.cumulative_logprob == pytest.approx(math.log(0.8))
    keep = search_table({(): {3: 1.0}, (3,): {9: 1.0}}, BeamSearchParams(
        beam_width=1, max_tokens=5, stop_token_ids=(9,), include_stop_str_in_output=True))
    assert keep.output("r", None, lambda t: ",".join(map(str, t))).outputs[0].text == "3,9"
    ignored = search_table({(): {EOS: 1.0}}, BeamSearchParams(beam_width=1, max_tokens=3, ignore_eos=True))
    best = ignored.output("r", None, str).outputs[0]
    assert best.token_ids == [EOS, EOS, EOS] and best.finish_reason == "length" and best.logprobs is None


@pytest.mark.parametrize("kwargs,word", [
    (dict(beam_width=0), "n"), (dict(beam_width=11), "n"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=9), "min_tokens"), (dict(logprobs=21), "logprobs"),
])
def test_validate_names_the_parameter(kwargs, word):
    with pytest.raises(ValueError, match=f"^(Requested )?{word}"):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs}).validate(max_logprobs=20)


# ---- on the engine (tiny random checkpoint) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(random_llama_dir, tmp_path_factory):
    from jaxserve import LLM
    return LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(tmp_path_factory.mktemp("ckpt")),
               dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, block_size=4)


PROMPT = [101, 2045, 3999, 17, 880, 4242, 12]


def test_width_one_is_greedy_decoding(llm):
    from jaxserve import SamplingParams
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    beam = llm.beam_search(PROMPT, BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))[0].outputs
    assert len(beam) == 1 and beam[0].token_ids == greedy.token_ids and beam[0].text == greedy.text


def test_beams_are_distinct_ranked_and_scored_by_the_model(llm):
    from jaxserve import SamplingParams
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True, logprobs=1)
    out = llm.beam_search({"prompt_token_ids": PROMPT}, params)[0]
    seqs = [o.token_ids for o in out.outputs]
    assert len(seqs) == 3 and len({tuple(s) for s in seqs}) == 3 and all(len(s) == 6 for s in seqs)
    cumulative = [o.cumulative_logprob for o in out.outputs]
    assert cumulative == sorted(cumulative, reverse=True)  # equal lengths: the score orders by log-probability
    for o in out.outputs:
        # The same tokens scored by the engine as a prompt: the search's sums are the model's.
        scored = llm.generate([{"prompt_token_ids": PROMPT + o.token_ids}],
                              SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
        total = sum(scored[len(PROMPT) + i][tok].logprob for i, tok in enumerate(o.token_ids))
        assert o.cumulative_logprob == pytest.approx(total, abs=1e-3)
        assert [lp[tok].logprob for lp, tok in zip(o.logprobs, o.token_ids)] == pytest.approx(
            [scored[len(PROMPT) + i][tok].logprob for i, tok in enumerate(o.token_ids)], abs=1e-3)


def test_several_prompts_search_together_as_alone(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True)
    other = [7, 300, 41, 5000]
    together = llm.beam_search([PROMPT, other], params)
    alone = [llm.beam_search(p, params)[0] for p in (PROMPT, other)]
    assert [[o.token_ids for o in r.outputs] for r in together] == [[o.token_ids for o in r.outputs] for r in alone]
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_model_len"):  # refused before any round runs
        llm.beam_search(PROMPT, BeamSearchParams(beam_width=2, max_tokens=125))
    assert not llm.engine.has_unfinished_requests()
