"""StopChecker: each stop rule with exact expectations, and streaming holdback."""
import random

import pytest

from jaxserve.sampling_params import SamplingParams
from jaxserve.stop_checker import StopChecker, StopDecision

EOS = 2
OTHER_EOS = 7


def run(checker: StopChecker, chunks: list[tuple[int, str]]) -> tuple[int, StopDecision | None, str]:
    """Feed (token_id, token_text) pairs; return (tokens consumed, decision, text when it stopped)."""
    text = ""
    for n, (token_id, piece) in enumerate(chunks, start=1):
        text += piece
        decision = checker.check(token_id, n, text, len(piece))
        if decision is not None:
            return n, decision, text
    return len(chunks), None, text


def tokens(*pieces: str) -> list[tuple[int, str]]:
    return [(100 + i, p) for i, p in enumerate(pieces)]


def test_no_stop_condition_runs_on():
    assert run(StopChecker(max_tokens=10), tokens("a", "b", "c")) == (3, None, "abc")


def test_stop_string_inside_one_token_cuts_it_out():
    n, decision, _ = run(StopChecker(stop=["END"]), tokens("Hello", " worldEND tail", "more"))
    assert n == 2
    assert decision == StopDecision("stop", "END", "Hello world")


def test_stop_string_spanning_tokens():
    n, decision, _ = run(StopChecker(stop=["\n\n"]), tokens("one", "\n", "\nnext", "x"))
    assert n == 3
    assert decision == StopDecision("stop", "\n\n", "one")


def test_stop_string_spanning_three_tokens():
    _, decision, _ = run(StopChecker(stop=["STOP"]), tokens("ab S", "T", "O", "Pcd"))
    assert decision == StopDecision("stop", "STOP", "ab ")


def test_first_of_several_stop_strings_in_text_wins_not_list_order():
    checker = StopChecker(stop=["zz", "bb", "b"])
    _, decision, _ = run(checker, tokens("aa", "a b bb zz"))
    assert decision == StopDecision("stop", "b", "aaa ")


def test_tie_on_end_prefers_the_longer_stop_string():
    _, decision, _ = run(StopChecker(stop=["c", "abc"]), tokens("xx", "abcd"))
    assert decision == StopDecision("stop", "abc", "xx")


def test_include_stop_str_in_output_keeps_it_and_drops_what_follows():
    checker = StopChecker(stop=["END"], include_stop_str_in_output=True)
    _, decision, _ = run(checker, tokens("Hello E", "ND and more"))
    assert decision == StopDecision("stop", "END", "Hello END")


def test_stop_string_before_the_new_text_is_not_found_again():
    # "ab" completed on token 1 while min_tokens held stops off; token 3 adds no new match.
    checker = StopChecker(stop=["ab"], min_tokens=2)
    n, decision, _ = run(checker, tokens("ab", "x", "y"))
    assert (n, decision) == (3, None)


def test_eos_stops_without_its_text_and_without_stop_reason():
    checker = StopChecker(eos_token_ids={EOS, OTHER_EOS})
    text = "hi<|im_end|>"
    assert checker.check(EOS, 2, text, len("<|im_end|>")) == StopDecision("stop", None, "hi")
    assert checker.check(OTHER_EOS, 2, "hi", 0) == StopDecision("stop", None, "hi")
    assert checker.check(5, 2, "hi!", 1) is None


def test_eos_text_is_dropped_even_with_include_stop_str_in_output():
    checker = StopChecker(eos_token_ids={EOS}, include_stop_str_in_output=True)
    assert checker.check(EOS, 1, "<eos>", 5) == StopDecision("stop", None, "")


def test_ignore_eos_runs_past_eos_until_length():
    checker = StopChecker(eos_token_ids={EOS}, ignore_eos=True, max_tokens=3)
    assert checker.check(EOS, 1, "a", 1) is None
    assert checker.check(EOS, 3, "abc", 1) == StopDecision("length", None, "abc")


def test_stop_token_id_reports_the_id_and_drops_its_text():
    checker = StopChecker(stop_token_ids=[42], eos_token_ids={EOS})
    assert checker.check(42, 3, "abc<sep>", 5) == StopDecision("stop", 42, "abc")


def test_stop_token_id_text_kept_with_include_stop_str_in_output():
    checker = StopChecker(stop_token_ids=[42], include_stop_str_in_output=True)
    assert checker.check(42, 3, "abc<sep>", 5) == StopDecision("stop", 42, "abc<sep>")


def test_stop_token_ids_apply_even_with_ignore_eos():
    checker = StopChecker(stop_token_ids=[EOS], eos_token_ids={EOS}, ignore_eos=True)
    assert checker.check(EOS, 1, "", 0) == StopDecision("stop", EOS, "")


@pytest.mark.parametrize("stop_kwargs, token_id, piece", [
    ({"eos_token_ids": {EOS}}, EOS, ""),
    ({"stop_token_ids": [42]}, 42, ""),
    ({"stop": ["x"]}, 100, "x"),
])
def test_min_tokens_defers_every_stop_kind(stop_kwargs, token_id, piece):
    checker = StopChecker(min_tokens=3, **stop_kwargs)
    assert checker.check(token_id, 1, "ab" + piece, len(piece)) is None
    assert checker.check(token_id, 2, "ab" + piece, len(piece)) is None
    decision = checker.check(token_id, 3, "ab" + piece, len(piece))
    assert decision is not None and decision.finish_reason == "stop" and decision.text == "ab"


def test_max_tokens_gives_length():
    checker = StopChecker(max_tokens=2, stop=["zzz"])
    assert run(checker, tokens("a", "b", "c")) == (2, StopDecision("length", None, "ab"), "ab")


def test_stop_on_the_last_allowed_token_is_a_stop_not_length():
    checker = StopChecker(max_tokens=2, stop=["b"], eos_token_ids={EOS})
    assert checker.check(101, 2, "ab", 1) == StopDecision("stop", "b", "a")
    assert checker.check(EOS, 2, "a", 0) == StopDecision("stop", None, "a")


def test_empty_stop_string_is_ignored():
    assert run(StopChecker(stop=[""]), tokens("a", "b")) == (2, None, "ab")


def test_from_sampling_params():
    params = SamplingParams(stop="###", stop_token_ids=[9], ignore_eos=True, min_tokens=1,
                            include_stop_str_in_output=True)
    checker = StopChecker.from_sampling_params(params, eos_token_ids=[EOS], max_tokens=50)
    assert (checker.stop, checker.stop_token_ids, checker.eos_token_ids) == (("###",), {9}, {EOS})
    assert (checker.ignore_eos, checker.min_tokens, checker.max_tokens) == (True, 1, 50)
    assert checker.include_stop_str_in_output


# -- streaming holdback ------------------------------------------------------------------------------

def test_holdback_is_the_longest_suffix_that_starts_a_stop_string():
    checker = StopChecker(stop=["</answer>", "STOP"])
    assert checker.holdback("text") == 0
    assert checker.holdback("text <") == 1
    assert checker.holdback("text </ans") == 5
    assert checker.holdback("text ST") == 2
    assert checker.holdback("text S<") == 1
    assert checker.holdback("</answer") == 8
    assert checker.holdback("") == 0


def test_holdback_zero_when_stop_strings_are_kept_or_absent():
    assert StopChecker(stop=["STOP"], include_stop_str_in_output=True).holdback("ST") == 0
    assert StopChecker().holdback("ST") == 0


def stream(checker: StopChecker, pieces: list[str]) -> tuple[list[str], StopDecision | None]:
    """What a streaming server sends: held-back text is released only once it cannot start a stop."""
    text, sent, chunks = "", 0, []
    for n, piece in enumerate(pieces, start=1):
        text += piece
        decision = checker.check(100, n, text, len(piece))
        if decision is not None:
            text = decision.text
            end = len(text)
        else:
            end = len(text) - checker.holdback(text)
        assert end >= sent, "holdback must never take back text already sent"
        chunks.append(text[sent:end])
        sent = end
        if decision is not None:
            return chunks, decision
    chunks.append(text[sent:])  # finished by length: release what was held
    return chunks, None


def test_streaming_holds_a_stop_prefix_then_stops_without_leaking_it():
    chunks, decision = stream(StopChecker(stop=["STOP"]), ["Hi S", "T", "OP and more"])
    assert chunks == ["Hi ", "", ""]
    assert decision == StopDecision("stop", "STOP", "Hi ")


def test_streaming_releases_held_text_when_it_is_not_a_stop():
    chunks, decision = stream(StopChecker(stop=["STOP"]), ["Hi S", "T", "ART", "!"])
    assert chunks == ["Hi ", "", "START", "!", ""]
    assert decision is None


def test_streaming_releases_held_text_at_the_end_by_length():
    chunks, decision = stream(StopChecker(stop=["STOP"]), ["Hi ST"])
    assert chunks == ["Hi ", "ST"] and decision is None


def test_streaming_random_texts_never_leak_a_stop_prefix():
    rng = random.Random(1234)
    stops = ["ab", "abc", "bca", "cc"]
    checker = StopChecker(stop=stops)
    for _ in range(500):
        text = "".join(rng.choice("abcd") for _ in range(rng.randrange(1, 20)))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, len(text))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        chunks, decision = stream(checker, pieces)
        sent = "".join(chunks)
        first_end = min((text.find(s) + len(s) for s in stops if s in text), default=None)
        if first_end is None:
            assert decision is None and sent == text
            continue
        assert decision is not None
        # Whatever was streamed is exactly the text before the stop string that ended it.
        assert sent == decision.text == text[:first_end - len(decision.stop_reason)]
        assert not any(s in sent for s in stops)
