"""Reasoning parsers (server/reasoning.py): a <think> block split from the answer, whole and streamed."""
import pytest

from jaxserve.server.reasoning import ReasoningStream, split_reasoning


@pytest.mark.parametrize("parser,text,want", [
    ("deepseek_r1", "Let me think.</think>It is 4.", ("Let me think.", "It is 4.")),
    ("deepseek_r1", "<think>Hmm.</think>Four", ("Hmm.", "Four")),
    ("deepseek_r1", "Still thinking when cut off", ("Still thinking when cut off", None)),
    ("deepseek_r1", "</think>Straight to it", (None, "Straight to it")),
    ("qwen3", "<think>Hmm.</think>\n\nFour", ("Hmm.", "\n\nFour")),
    ("qwen3", "No thinking at all", (None, "No thinking at all")),
    ("qwen3", "<think>cut off before the end", (None, "<think>cut off before the end")),
])
def test_whole_outputs_split(parser, text, want):
    assert split_reasoning(parser, text) == want


def stream(parser, pieces):
    splitter = ReasoningStream(parser)
    parts = [splitter.add(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return parts, "".join(r or "" for r, _ in parts), "".join(c or "" for _, c in parts)


@pytest.mark.parametrize("parser,pieces,reasoning,content", [
    ("deepseek_r1", ["Let me", " think.</think>", "It is", " 4."], "Let me think.", "It is 4."),
    ("deepseek_r1", ["<th", "ink>Hmm", " ok</th", "ink>Fo", "ur"], "Hmm ok", "Four"),  # tags cut between deltas
    ("deepseek_r1", ["Hmm <", "/b> still"], "Hmm </b> still", ""),  # a near-miss of the tag is reasoning
    ("qwen3", ["<think>", "Hmm", "</think>", "\n\nFour"], "Hmm", "\n\nFour"),
    ("qwen3", ["<", "b>Bold answer"], "", "<b>Bold answer"),  # not a think block after all
    ("qwen3", ["No", " thinking"], "", "No thinking"),
])
def test_streamed_outputs_split_at_the_same_place(parser, pieces, reasoning, content):
    parts, got_reasoning, got_content = stream(parser, pieces)
    assert (got_reasoning, got_content) == (reasoning, content)
    # nothing is sent twice or held past the end: the pieces' text is all accounted for, tags aside
    assert len("".join(pieces)) - len(got_reasoning) - len(got_content) in (0, 7, 8, 15)


def test_a_held_back_tag_start_is_sent_once_it_is_not_the_tag():
    splitter = ReasoningStream("deepseek_r1")
    assert splitter.add("a</") == ("a", None)  # "</" could begin </think>: held back
    assert splitter.add("p> b") == ("</p> b", None)
