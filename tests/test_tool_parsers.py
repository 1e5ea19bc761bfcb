"""Tool-call parsers (auto tool choice) and forced tool calls through guided decoding."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from jaxserve.server.tool_parsers import get_tool_parser, json_value_end, scan_object
from jaxserve.server.tools import (ToolRequestError, guided_params_for_tools, guided_tool_call_streamer,
                                   normalize_tool_choice, required_tools_schema, tool_calls_from_guided_output)

CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0}},
    "required": ["a", "b"], "additionalProperties": False}}}
NO_ARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, ADD, NO_ARGS]


def chunkings(text, seed=0):
    """Whole text, one char at a time, and random chunk sizes."""
    rng = np.random.default_rng(seed)
    yield [text]
    yield list(text)
    cuts, i = [], 0
    while i < len(text):
        n = int(rng.integers(1, 9))
        cuts.append(text[i:i + n])
        i += n
    yield cuts


def stream(parser, chunks):
    """Feed chunks like the server does; rebuild content and calls from the deltas, checking their order."""
    content, calls, current = "", {}, ""
    deltas = []
    for chunk in chunks:
        previous, current = current, current + chunk
        deltas.append(parser.extract_tool_calls_streaming(previous, current, chunk))
    deltas.append(parser.finish_streaming(current))
    for delta in filter(None, deltas):
        content += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            if tc["index"] not in calls:
                assert tc["index"] == len(calls), "calls must start in index order"
                assert CALL_ID.fullmatch(tc["id"]) and tc["type"] == "function" and tc["function"]["name"]
                calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            else:
                assert "name" not in tc["function"], "the name is sent once, first"
            calls[tc["index"]]["arguments"] += tc["function"].get("arguments", "")
    return content, [calls[i] for i in range(len(calls))]


def check_both_ways(parser_name, text, want_content, want_calls):
    content, calls = get_tool_parser(parser_name).extract_tool_calls(text)
    assert content == want_content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want_calls
    assert all(CALL_ID.fullmatch(c["id"]) and c["type"] == "function" for c in calls)
    for chunks in chunkings(text):
        parser = get_tool_parser(parser_name)
        s_content, s_calls = stream(parser, chunks)
        assert s_content == (want_content or ""), chunks
        assert [(c["name"], json.loads(c["arguments"])) for c in s_calls] == want_calls
        assert parser.streamed_tool_calls == len(want_calls)


# ---------------------------------------------------------------- JSON scanning
def test_json_value_end_handles_strings_nesting_and_partial_text():
    text = '{"a": "x}\\"y", "b": [1, {"c": null}]} tail'
    assert json_value_end(text, 0) == text.index(" tail")
    assert json_value_end('{"a": [1, 2', 0) is None
    assert json_value_end('"abc\\"', 0) is None
    assert json_value_end("123", 0) is None  # may still grow
    assert json_value_end("123,", 0) == 3
    scan = scan_object('{"name": "f", "arguments": {"x": "}', 0)
    assert scan.end is None and scan.fields["name"] == (9, 12) and scan.fields["arguments"][1] is None


# ---------------------------------------------------------------- auto tool-choice parsers
HERMES_TWO = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"FR\\"", '
              '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}"}]}}'
              '\n</tool_call>')


def test_hermes_content_and_two_calls():
    check_both_ways("hermes", HERMES_TWO, "Let me check.\n",
                    [("get_weather", {"city": 'Paris "FR"', "unit": "c"}), ("add", {"a": 1, "b": [2, {"c": "}"}]})])


def test_hermes_call_only_has_no_content_and_tolerates_missing_close_tag():
    check_both_ways("hermes", '<tool_call>{"arguments": {"q": 1.5}, "name": "now"}', None, [("now", {"q": 1.5})])


def test_hermes_plain_text_and_a_lookalike_tag_stay_content():
    for text in ["The answer is 4. a <b> c", "ends with a half tag <tool_ca"]:
        check_both_ways("hermes", text, text, [])


def test_hermes_broken_call_falls_back_to_content():
    text = 'Hi <tool_call>{"name": "add", "arguments": {"a": 1,}</tool_call>'
    content, calls = get_tool_parser("hermes").extract_tool_calls(text)
    assert (content, calls) == (text, [])


def test_hermes_stream_sends_name_before_arguments_arrive():
    parser = get_tool_parser("hermes")
    text = '<tool_call>{"name": "add", "arguments": {"a": 12'
    first = parser.extract_tool_calls_streaming("", text[:30], text[:30])
    assert first["tool_calls"][0]["function"] == {"name": "add", "arguments": ""}
    more = parser.extract_tool_calls_streaming(text[:30], text, text[30:])
    assert more == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 12'}}]}


def test_llama3_json_with_python_tag_and_semicolons():
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}; '
            '{"name": "add", "parameters": {"a": -3, "b": 4}}')
    check_both_ways("llama3_json", text, None, [("get_weather", {"city": "Oslo", "unit": "f"}),
                                                ("add", {"a": -3, "b": 4})])


def test_llama3_json_without_tag_and_stringified_arguments():
    check_both_ways("llama3_json", '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', None,
                    [("add", {"a": 1, "b": 2})])


def test_llama3_json_plain_text_and_non_call_json_are_content():
    for text in ["Sure, it is sunny.", '{"city": "Oslo"}', "<|python"]:
        check_both_ways("llama3_json", text, text, [])


def test_mistral_array():
    text = '[TOOL_CALLS] [{"name": "now", "arguments": {}}, {"name": "add", "arguments": {"a": 0, "b": 9}}]'
    check_both_ways("mistral", text, None, [("now", {}), ("add", {"a": 0, "b": 9})])


def test_unknown_parser_name():
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")


# ---------------------------------------------------------------- tools / tool_choice validation
@pytest.mark.parametrize("tools, choice, param, needle", [
    (None, "required", "tool_choice", "only allowed when 'tools' are specified"),
    (None, {"type": "function", "function": {"name": "add"}}, "tool_choice", "only allowed when"),
    (TOOLS, {"type": "function", "function": {"name": "mul"}}, "tool_choice", "function 'mul' was not found"),
    (TOOLS, "sometimes", "tool_choice", "Invalid value for 'tool_choice': 'sometimes'"),
    (TOOLS, {"type": "function"}, "tool_choice", "Invalid value for 'tool_choice'"),
    ([{"type": "function", "function": {}}], "auto", "tools", "tools[0].function.name"),
    ([{"type": "retrieval"}], "auto", "tools", "only 'function' tools"),
    ([ADD, ADD], "auto", "tools", "Duplicate function name 'add'"),
    ("add", "auto", "tools", "expected an array"),
])
def test_invalid_tool_requests(tools, choice, param, needle):
    with pytest.raises(ToolRequestError, match=re.escape(needle)) as info:
        guided_params_for_tools(tools, choice, True)
    assert info.value.param == param and isinstance(info.value, ValueError)


def test_tool_choice_defaults_and_auto_needs_the_flag():
    assert normalize_tool_choice(None, None) == "none"
    assert normalize_tool_choice(TOOLS, None) == "auto"
    assert normalize_tool_choice(TOOLS, None, auto_tool_choice_enabled=False) == "none"
    assert normalize_tool_choice(None, "none") == "none"
    with pytest.raises(ToolRequestError, match="--enable-auto-tool-choice"):
        normalize_tool_choice(TOOLS, "auto", auto_tool_choice_enabled=False)
    assert guided_params_for_tools(TOOLS, "auto", True) is None
    assert guided_params_for_tools(TOOLS, "none", True) is None


def test_named_function_schema_is_its_parameters():
    g = guided_params_for_tools(TOOLS, {"type": "function", "function": {"name": "add"}}, True)
    assert g.json == ADD["function"]["parameters"] and g.constraint_kinds() == ["json"]
    assert guided_params_for_tools(TOOLS, {"type": "function", "function": {"name": "now"}}).json["type"] == "object"


def test_required_schema_accepts_calls_and_rejects_mismatches():
    schema = guided_params_for_tools(TOOLS, "required", True).json
    good = [{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "now", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "add", "parameters": {"city": "x", "unit": "c"}}],
                [{"name": "mul", "parameters": {}}], [{"parameters": {}, "name": "now", "x": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = guided_params_for_tools(TOOLS, "required", False).json
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single)
    assert single == required_tools_schema(TOOLS, parallel_tool_calls=False)


def test_tool_calls_from_guided_output():
    named = {"type": "function", "function": {"name": "add"}}
    [call] = tool_calls_from_guided_output('{"a": 1, "b": 2}', TOOLS, named)
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'} and CALL_ID.fullmatch(call["id"])
    calls = tool_calls_from_guided_output('[{"name": "now", "parameters": {}}, {"name": "add", "parameters": '
                                          '{"a": 1, "b": 2}}]', TOOLS, "required")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("now", {}), ("add", {"a": 1, "b": 2})]
    assert len({c["id"] for c in calls}) == 2
    assert tool_calls_from_guided_output('[{"name": "now", "param', TOOLS, "required") == []


def test_named_function_streaming():
    text = '{"city": "Rome", "unit": "c"}'
    for chunks in chunkings(text):
        content, calls = stream(guided_tool_call_streamer(TOOLS, {"type": "function",
                                                                  "function": {"name": "get_weather"}}), chunks)
        assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [("get_weather", text)]


# ---------------------------------------------------------------- forced calls through the real matcher
@pytest.fixture(scope="module")
def compiler():
    from jaxserve.guided import GuidedDecodingCompiler
    from jaxserve.models.weights import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(None))
    return GuidedDecodingCompiler(tokenizer, 49152)


def sample_tokens(compiler, params, seed, max_steps=400):
    """A seeded random 'model' restricted to the bitmask, with a taste for closing punctuation."""
    from jaxserve.guided import allocate_bitmask, bitmask_to_allowed_numpy

    tok = compiler.tokenizer
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    taste = np.array([4.0 * any(c in t for c in '"}],') + 1.5 * (len(t) <= 2) - 4.0 * (bool(t) and not t.strip())
                      for t in texts] + [0.0] * (49152 - len(texts)))
    taste[tok.eos_token_id] += 6.0
    matcher, rng, row, out = compiler.matcher_for(params), np.random.default_rng(seed), allocate_bitmask(1, 49152)[0], []
    while not matcher.is_terminated() and len(out) < max_steps:
        matcher.fill_bitmask(row)
        allowed = bitmask_to_allowed_numpy(row, 49152)
        t = int(np.argmax(np.where(allowed, taste + rng.gumbel(size=49152), -np.inf)))
        assert matcher.accept_token(t)
        if t != tok.eos_token_id:
            out.append(t)
    assert matcher.is_terminated()
    return out


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_generated_under_guidance_parse_and_stream(compiler, parallel):
    params = guided_params_for_tools(TOOLS, "required", parallel)
    by_name = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in TOOLS}
    for seed in range(4):
        tokens = sample_tokens(compiler, params, seed)
        text = compiler.tokenizer.decode(tokens)
        calls = tool_calls_from_guided_output(text, TOOLS, "required")
        assert 1 <= len(calls) and (parallel or len(calls) == 1), text
        assert "\n" not in text, text  # compact whitespace (JSON strings hold no raw newline)
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), by_name[c["function"]["name"]])
        # Streaming token by token gives the same calls (holding back half-decoded UTF-8, as a detokenizer does).
        pieces = [p for p in (compiler.tokenizer.decode(tokens[:i + 1]) for i in range(len(tokens)))
                  if not p.endswith("\ufffd")]
        chunks = [b[len(a):] for a, b in zip([""] + pieces, pieces)]
        _, streamed = stream(guided_tool_call_streamer(TOOLS, "required"), chunks)
        assert [(s["name"], json.loads(s["arguments"])) for s in streamed] == \
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_named_tool_call_generated_under_guidance_validates(compiler):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        text = compiler.tokenizer.decode(sample_tokens(compiler, guided_params_for_tools(TOOLS, named), seed))
        [call] = tool_calls_from_guided_output(text, TOOLS, named)
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])


def test_pythonic_calls():
    text = '[get_weather(city="Oslo, \'NO\'", unit="c"), add(a=1, b=2), now()]'
    check_both_ways("pythonic", text, None, [("get_weather", {"city": "Oslo, 'NO'", "unit": "c"}),
                                             ("add", {"a": 1, "b": 2}), ("now", {})])
    check_both_ways("pythonic", '<|python_start|>[add(a=[1, 2], b={"k": None})]<|python_end|>', None,
                    [("add", {"a": [1, 2], "b": {"k": None}})])


def test_pythonic_plain_text_and_plain_lists_are_content():
    for text in ["It is sunny.", "[1, 2, 3]", "[citation needed]"]:
        check_both_ways("pythonic", text, text, [])
