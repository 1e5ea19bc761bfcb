"""Request models -> SamplingParams, without a server: defaults, mappings, and clear refusals."""
import pytest

from jaxserve.beam_search import BeamSearchParams
from jaxserve.sampling_params import RequestOutputKind
from jaxserve.server.errors import APIError
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest
from jaxserve.server.serving_common import resolve_max_tokens

MSGS = [{"role": "user", "content": "hi"}]


def test_completion_defaults_follow_openai():
    req = CompletionRequest(prompt="x")
    assert req.max_tokens == 16 and req.n == 1 and req.echo is False and req.logprobs is None
    params = req.to_sampling_params(req.max_tokens)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, -1, 0.0)
    assert params.max_tokens == 16 and params.stop == [] and params.logprobs is None
    assert params.output_kind == RequestOutputKind.DELTA


def test_explicit_null_max_tokens_means_context_limit():
    req = CompletionRequest.model_validate({"prompt": "x", "max_tokens": None})
    assert req.max_tokens is None
    assert resolve_max_tokens(512, 12, req.max_tokens, "prompt") == 500


def test_max_tokens_past_the_context_is_capped_to_the_room_left():
    """As vLLM: a completion that would run past the context is capped there; only a prompt that leaves no room
    or max_tokens beyond the whole context are a 400, naming the token counts and the parameter at fault."""
    assert resolve_max_tokens(512, 500, 20, "messages") == 12
    assert resolve_max_tokens(512, 12, 512, "prompt") == 500
    assert resolve_max_tokens(512, 12, 30, "prompt") == 30
    with pytest.raises(APIError) as err:
        resolve_max_tokens(512, 12, 513, "prompt")
    assert err.value.status == 400 and err.value.param == "max_tokens"
    assert "512" in err.value.message and "513" in err.value.message and "12 in the prompt" in err.value.message
    with pytest.raises(APIError) as err:
        resolve_max_tokens(512, 512, 1, "messages")
    assert err.value.param == "messages" and "has 512 tokens" in err.value.message


def test_vllm_extras_reach_sampling_params():
    req = CompletionRequest.model_validate({
        "prompt": "x", "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "stop": "END",
        "stop_token_ids": [7], "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 2,
        "skip_special_tokens": False, "spaces_between_special_tokens": False, "seed": 3,
        "logit_bias": {"42": -100}, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "prompt_logprobs": 2, "allowed_token_ids": [1, 2, 3]})
    p = req.to_sampling_params(16)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.seed) == (5, 0.1, 1.2, 3)
    assert p.stop == ["END"] and p.stop_token_ids == [7] and p.include_stop_str_in_output
    assert p.ignore_eos and p.min_tokens == 2 and not p.skip_special_tokens
    assert not p.spaces_between_special_tokens and p.logit_bias == {42: -100.0}
    assert (p.presence_penalty, p.frequency_penalty, p.prompt_logprobs) == (0.5, -0.5, 2)
    assert p.allowed_token_ids == [1, 2, 3]


def test_completion_echo_with_logprobs_asks_for_prompt_logprobs():
    p = CompletionRequest(prompt="x", echo=True, logprobs=3).to_sampling_params(4)
    assert p.logprobs == 3 and p.prompt_logprobs == 3


@pytest.mark.parametrize("body,param", [
    ({"use_beam_search": True, "stop": "x"}, "stop"),
    ({"use_beam_search": True, "guided_choice": ["a"]}, "guided_choice"),
    ({"use_beam_search": True, "response_format": {"type": "json_object"}}, "response_format"),
    ({"use_beam_search": True, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"use_beam_search": True, "n": 2, "best_of": 3}, "best_of"),
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"early_stopping": True}, "early_stopping"),
    ({"suffix": "tail"}, "suffix"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
])
def test_unsupported_or_conflicting_parameters_are_refused(body, param):
    req = CompletionRequest.model_validate({"prompt": "x", **body})
    with pytest.raises(APIError) as err:
        req.to_sampling_params(16)
    assert err.value.status == 400 and err.value.param == param


def test_beam_search_request_maps_to_beam_search_params():
    p = CompletionRequest(prompt="x", use_beam_search=True, n=3, length_penalty=0.5, early_stopping=True,
                          min_tokens=2, stop_token_ids=[7], logprobs=2, ignore_eos=True).to_sampling_params(9)
    assert isinstance(p, BeamSearchParams)
    assert (p.beam_width, p.max_tokens, p.length_penalty, p.early_stopping) == (3, 9, 0.5, True)
    assert (p.min_tokens, p.stop_token_ids, p.logprobs, p.ignore_eos) == (2, (7,), 2, True)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], use_beam_search=True, n=2,
                                 logprobs=True, top_logprobs=3).to_sampling_params(5)
    assert (chat.beam_width, chat.logprobs, chat.max_tokens) == (2, 3, 5)


def test_guided_parameters_map_to_one_constraint():
    p = CompletionRequest(prompt="x", guided_choice=["yes", "no"]).to_sampling_params(4)
    assert p.guided_decoding.choice == ["yes", "no"] and p.guided_decoding.constraint_kinds() == ["choice"]
    p = CompletionRequest(prompt="x", guided_json='{"type": "object"}', guided_decoding_backend="llguidance",
                          guided_whitespace_pattern=" ?").to_sampling_params(4)
    g = p.guided_decoding
    assert g.json == {"type": "object"} and g.backend == "llguidance" and g.whitespace_pattern == " ?"
    p = CompletionRequest(prompt="x", guided_grammar="start: 'a'").to_sampling_params(4)
    assert p.guided_decoding.grammar == "start: 'a'"


def test_response_format_and_structured_outputs():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = ChatCompletionRequest.model_validate({"messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}})
    assert req.to_sampling_params(8).guided_decoding.json == schema
    req = ChatCompletionRequest.model_validate({"messages": MSGS, "response_format": {"type": "json_object"}})
    assert req.to_sampling_params(8).guided_decoding.json_object is True
    req = ChatCompletionRequest.model_validate({"messages": MSGS, "response_format": {"type": "text"}})
    assert req.to_sampling_params(8).guided_decoding is None
    req = ChatCompletionRequest.model_validate({"messages": MSGS, "structured_outputs": {"regex": "[0-9]+"}})
    assert req.to_sampling_params(8).guided_decoding.regex == "[0-9]+"
    req = ChatCompletionRequest.model_validate({"messages": MSGS, "structured_outputs": {"regex": "a"},
                                                "guided_choice": ["b"]})
    with pytest.raises(APIError):
        req.to_sampling_params(8)
    for empty in ({}, {"whitespace_pattern": " "}, {"json_object": False}):  # no constraint: refused, as vLLM
        req = ChatCompletionRequest.model_validate({"messages": MSGS, "structured_outputs": empty})
        with pytest.raises(APIError) as err:
            req.to_sampling_params(8)
        assert err.value.param == "structured_outputs"


def test_chat_logprobs_and_max_completion_tokens():
    req = ChatCompletionRequest.model_validate({"messages": MSGS, "logprobs": True, "top_logprobs": 4,
                                                "max_tokens": 9, "max_completion_tokens": 7})
    assert req.requested_max_tokens == 7
    assert req.to_sampling_params(7).logprobs == 4
    assert ChatCompletionRequest.model_validate({"messages": MSGS}).to_sampling_params(5).logprobs is None
    assert ChatCompletionRequest.model_validate({"messages": MSGS}).requested_max_tokens is None


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": MSGS, "top_logprobs": 2},
    {"messages": MSGS, "continue_final_message": True},  # add_generation_prompt defaults to true
    {"messages": MSGS, "stream_options": {"include_usage": True}},  # only with stream
])
def test_invalid_chat_requests_fail_validation(body):
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_empty_stream_options_pass_without_stream():
    req = ChatCompletionRequest.model_validate({"messages": MSGS, "stream_options": {}})
    assert not req.stream and req.to_sampling_params(5).max_tokens == 5


def test_explicit_nulls_take_the_defaults():
    req = ChatCompletionRequest.model_validate({"messages": MSGS, "n": None, "stream": None, "logprobs": None,
                                                "ignore_eos": None, "max_tokens": None, "top_logprobs": None})
    assert (req.n, req.stream, req.logprobs, req.ignore_eos, req.max_tokens) == (1, False, False, False, None)
    req = CompletionRequest.model_validate({"prompt": "x", "echo": None, "max_tokens": None})
    assert req.echo is False and req.max_tokens is None  # null max_tokens keeps its own meaning


def test_stream_options_include_no_usage_unless_asked():
    body = {"messages": MSGS, "stream": True}
    assert not ChatCompletionRequest.model_validate({**body, "stream_options": {}}).include_usage_in_stream
    assert ChatCompletionRequest.model_validate(
        {**body, "stream_options": {"include_usage": True}}).include_usage_in_stream


def test_tool_choice_defaults():
    assert ChatCompletionRequest.model_validate({"messages": MSGS}).effective_tool_choice == "none"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert ChatCompletionRequest.model_validate({"messages": MSGS, "tools": tools}).effective_tool_choice == "auto"


def test_whole_reply_tool_calls_have_no_stream_index():
    from jaxserve.server.chat_tools import tool_call_out
    from jaxserve.server.responses import ChatMessageOut, DeltaMessage
    call = tool_call_out({"name": "f", "arguments": {"a": 1}}, index=0)
    whole = ChatMessageOut(role="assistant", tool_calls=[call]).model_dump()["tool_calls"][0]
    assert "index" not in whole and whole["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert DeltaMessage(tool_calls=[call]).model_dump()["tool_calls"][0]["index"] == 0


def test_responses_request_becomes_a_chat_request():
    from jaxserve.server.serving_responses import ResponsesRequest
    req = ResponsesRequest.model_validate({
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                  {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
                  {"role": "user", "content": "Bye"}],
        "instructions": "Be brief.", "max_output_tokens": 7, "temperature": 0.5, "top_logprobs": 3, "top_k": 4,
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}})
    chat = req.to_chat()
    assert [(m.role, m.content if isinstance(m.content, str) else m.content[0]["text"]) for m in chat.messages] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]
    assert (chat.max_tokens, chat.temperature, chat.logprobs, chat.top_logprobs, chat.top_k) == (7, 0.5, True, 3, 4)
    assert chat.response_format.json_schema.json_schema == {"type": "object"}
    for body, param in [({"input": [{"type": "function_call_output", "output": "1"}]}, "input"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input")]:
        with pytest.raises(APIError) as err:
            ResponsesRequest.model_validate(body).to_chat()
        assert err.value.param == param
    with pytest.raises(APIError) as err:
        ResponsesRequest.model_validate({"input": "x", "background": True}).refuse_unsupported()
    assert err.value.param == "background"


def test_vllm_command_lines_start_with_their_no_op_flags_named(caplog, monkeypatch):
    from jaxserve.config import EngineConfig
    from jaxserve.server.args import build_parser, configs_from_args

    monkeypatch.setenv("JAX_PLATFORMS", "restored-after-the-test")  # --device cpu sets it: monkeypatch undoes
    monkeypatch.delenv("JAX_PLATFORMS")
    argv = ["--enforce-eager", "--disable-log-stats", "--swap-space", "4", "--uvicorn-log-level", "warning",
            "--no-enable-chunked-prefill", "--task", "generate", "--load-format", "safetensors", "-tp", "1",
            "--device", "cpu", "--max-model-len", "512", "--calculate-kv-scales"]
    with caplog.at_level("WARNING", logger="jaxserve.server"):
        engine, _ = configs_from_args(build_parser().parse_args(argv))
    named = " ".join(r.getMessage() for r in caplog.records)
    for flag in ("--enforce-eager", "--disable-log-stats", "--swap-space 4", "--uvicorn-log-level warning",
                 "--no-enable-chunked-prefill", "--calculate-kv-scales"):
        assert flag in named
    assert engine == EngineConfig(max_model_len=512)  # nothing else reaches the engine
    import os
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert configs_from_args(build_parser().parse_args(["-tp", "2"]))[0].tensor_parallel_size == 2
    assert configs_from_args(build_parser().parse_args(["--kv-cache-dtype", "fp8"]))[0].kv_cache_dtype == "fp8"
    budgets = configs_from_args(build_parser().parse_args(["--checkpoint-cache-max-gb", "0.5",
                                                           "--compilation-cache-max-gb", "-1"]))[0]
    assert (budgets.checkpoint_cache_max_gb, budgets.compilation_cache_max_gb) == (0.5, -1)
    for bad in (["-pp", "2"], ["--task", "embed"], ["--load-format", "pt"], ["--device", "xpu"],
                ["--kv-cache-dtype", "fp8_inc"]):
        with pytest.raises(SystemExit):
            configs_from_args(build_parser().parse_args(bad))
