"""The real `jaxserve` server (subprocess, default SmolLM2 model) driven by the official OpenAI client."""
import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from server_utils import jaxserve_subprocess

MODEL = "SmolLM2-135M-Instruct"
SERVER_ARGS = ("--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
               "--kv-cache-memory", "256MiB", "--api-key", "test-key", "--enable-prompt-tokens-details")


@pytest.fixture(scope="module")
def base_url():
    with jaxserve_subprocess(*SERVER_ARGS, timeout=900) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="test-key", max_retries=0)


def chat(client, content, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_chat_answers_and_counts_usage(client):
    r = chat(client, "What is the capital of France?", max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_usage_equals_tokenizer_counts(client, base_url):
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    tok = httpx.post(base_url + "/tokenize", json={"model": MODEL, "prompt": "The quick brown fox"},
                     headers={"Authorization": "Bearer test-key"}).json()
    assert r.usage.prompt_tokens == tok["count"]
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_streaming_matches_non_streaming(client):
    kw = dict(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])


def test_greedy_speculation_streams_every_token(client, base_url):
    """A greedy request over text that loops keeps several draft tokens a step, yet streams one chunk per token
    and the text of a request that does not draft (logprobs turn drafting off)."""
    def accepted():
        metrics = httpx.get(base_url + "/metrics", headers={"Authorization": "Bearer test-key"}).text
        return float(re.search(r"^jaxserve:spec_decode_num_accepted_tokens_total\{[^}]*\} (\S+)$", metrics,
                               re.M).group(1))
    before = accepted()
    kw = dict(model=MODEL, prompt="Paper small that day paper small that day paper small that day paper",
              max_tokens=40, temperature=0)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert chunks[-1].usage.completion_tokens == 40 and len(texts) == 40
    assert accepted() > before
    assert "".join(texts) == client.completions.create(logprobs=1, **kw).choices[0].text


def test_usage_reports_prompt_tokens_the_prefix_cache_served(client):
    prompt = "A long shared preamble that several requests repeat word for word. " * 6
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and first.usage.prompt_tokens - 16 <= cached < first.usage.prompt_tokens
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_stop_string_cuts_text(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=["7"])
    assert r.choices[0].finish_reason == "stop" and "7" not in r.choices[0].text
    assert r.choices[0].text.strip().startswith("5")


def test_seed_reproduces_and_n_choices(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=42, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]


def test_logprobs_formats(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and all(len(t) >= 2 for t in lp.top_logprobs)
    c = chat(client, "Hi", max_tokens=3, logprobs=True, top_logprobs=3, temperature=0)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)


def test_guided_choice_regex_and_json(client):
    r = chat(client, "Is the sky blue? Answer yes or no.", max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = chat(client, "Give me a phone number.", max_tokens=20, extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", r.choices[0].message.content)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = chat(client, "Describe a person as JSON.", max_tokens=60,
             response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
             extra_body={"guided_whitespace_pattern": r"[ ]?"})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_forced_tool_call(client):
    # No extra properties and greedy: with the defaults (temperature 1, open objects) a small model may add
    # properties until max_tokens cuts the arguments short, which is allowed but not what this test checks.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}}}]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=40,
        temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


def test_errors(client, base_url):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(base_url + "/health").status_code == 200


def test_disconnect_frees_pages(base_url):
    headers = {"Authorization": "Bearer test-key"}
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "stream": True,
            "extra_body": None, "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    for _ in range(100):
        metrics = httpx.get(base_url + "/metrics").text
        running = re.search(r"^jaxserve:num_requests_running\{[^}]*\} (\S+)", metrics, re.M)
        usage = re.search(r"^jaxserve:kv_cache_usage_perc\{[^}]*\} (\S+)", metrics, re.M)
        if running and float(running.group(1)) == 0 and float(usage.group(1)) == 0:
            return
        import time
        time.sleep(0.2)
    pytest.fail("the aborted request still holds KV pages")


def test_32_concurrent_streams_complete(base_url):
    async def one(client, i):
        stream = await client.completions.create(model=MODEL, prompt=f"Count from {i}:", max_tokens=8,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="test-key", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    sync = openai.OpenAI(base_url=base_url + "/v1", api_key="test-key", max_retries=0)
    for i in range(32):  # same input, same output under concurrency: a row's arithmetic ignores its batch
        alone = sync.completions.create(model=MODEL, prompt=f"Count from {i}:", max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text
        assert results[i] == alone, i
    assert all(results)


def concurrent_and_alone(base_url, requests):
    """Completions for each kwargs in `requests`, all sent at once, then each again alone: (together, alone)."""
    async def main():
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="test-key", max_retries=0)
        return await asyncio.gather(*(client.completions.create(**kw) for kw in requests))

    together = asyncio.run(main())
    sync = openai.OpenAI(base_url=base_url + "/v1", api_key="test-key", max_retries=0)
    return [r.choices[0] for r in together], [sync.completions.create(**kw).choices[0] for kw in requests]


def test_long_prompts_concurrent_equal_alone(base_url):
    """Past 128 positions a decoding token's attention is split into parts; the split depends on the token's
    own positions only, so concurrency does not change greedy outputs (logprobs included)."""
    preamble = "Here is a long list of facts about the city of Lyon, its rivers, its food and its history. " * 8
    requests = [dict(model=MODEL, prompt=preamble + f"Fact number {i}:", max_tokens=12, temperature=0, logprobs=1,
                     extra_body={"ignore_eos": True}) for i in range(4)]
    together, alone = concurrent_and_alone(base_url, requests)
    for batched, single in zip(together, alone):
        assert single.text == batched.text
        assert single.logprobs.token_logprobs == batched.logprobs.token_logprobs


def test_seeded_samples_concurrent_equal_alone(base_url):
    """A seeded sampled request draws the same tokens alone or among others."""
    requests = [dict(model=MODEL, prompt=f"A poem about {w}:", seed=i, max_tokens=12, temperature=0.9, top_p=0.95,
                     extra_body={"ignore_eos": True}) for i, w in enumerate(["cats", "rain", "bread", "trains"])]
    together, alone = concurrent_and_alone(base_url, requests)
    assert [c.text for c in alone] == [c.text for c in together]


def test_chat_stream_role_first_and_n_interleaved(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=6, stream=True, n=2, temperature=1.0, seed=1))
    assert chunks[0].choices[0].delta.role == "assistant"
    indices = [c.choices[0].index for c in chunks if c.choices]
    assert set(indices) == {0, 1}
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_continue_final_message_with_echo(client):
    r = client.chat.completions.create(
        model=MODEL, max_tokens=5, temperature=0,
        messages=[{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "The color is"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True})
    assert r.choices[0].message.content.startswith("The color is")


@pytest.mark.parametrize("kwargs,param", [
    (dict(n=11, extra_body={"use_beam_search": True}), "n"),
    (dict(stop=["x"], extra_body={"use_beam_search": True}), "stop"),
    (dict(suffix="x"), "suffix"),
    (dict(logprobs=50), "logprobs"),
    (dict(n=0), "n"),
    (dict(extra_body={"guided_regex": "(["}), "guided_regex"),
    (dict(extra_body={"guided_choice": ["a"], "guided_regex": "a"}), None),
    (dict(extra_body={"priority": 1}), "priority"),  # the server schedules first come, first served
])
def test_bad_parameters_name_themselves(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=3, **kwargs)
    if param:
        assert info.value.body["param"] == param


def test_tokenize_detokenize_round_trip(base_url):
    headers = {"Authorization": "Bearer test-key"}
    tok = httpx.post(base_url + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}, headers=headers).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    text = httpx.post(base_url + "/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}, headers=headers).json()
    assert text["prompt"] == "Hello world"


def test_required_tool_choice_parses_or_reports_length(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}}}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=tools, tool_choice="required", max_tokens=60, temperature=0,
                                       extra_body={"guided_whitespace_pattern": r"[ ]?"})
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), tools[0]["function"]["parameters"])
    else:
        assert choice.finish_reason == "length" and not choice.message.tool_calls


def test_beam_search_completions_and_chat(client):
    prompt = "The capital of France is"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    beam = dict(model=MODEL, prompt=prompt, max_tokens=8, extra_body={"use_beam_search": True})
    assert client.completions.create(n=1, **beam).choices[0].text == greedy
    r = client.completions.create(n=3, logprobs=1, **beam)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) == 3
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, n=2,
                                           extra_body={"use_beam_search": True})
    assert "Paris" in whole.choices[0].message.content
    streamed = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, n=2, stream=True,
                                                extra_body={"use_beam_search": True}):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert streamed == {c.index: c.message.content for c in whole.choices}


def test_responses_api_whole_streamed_and_structured(client):
    r = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=20,
                                temperature=0)
    assert r.status == "completed" and "Paris" in r.output_text
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    answer = chat(client, "What is the capital of France?", max_tokens=20, temperature=0)
    assert r.output_text == answer.choices[0].message.content  # the same prompt through the chat template
    events = list(client.responses.create(model=MODEL, input="What is the capital of France?",
                                          max_output_tokens=20, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text == events[-1].response.output_text
    short = client.responses.create(model=MODEL, instructions="Answer in one word.", max_output_tokens=3,
                                    input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                                    temperature=0, top_logprobs=2)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert len(short.output[0].content[0].logprobs) == short.usage.output_tokens == 3
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    structured = client.responses.create(model=MODEL, input="Name a city as JSON.", max_output_tokens=40,
                                         temperature=0, text={"format": {"type": "json_schema", "name": "city",
                                                                         "schema": schema}})
    jsonschema.validate(json.loads(structured.output_text), schema)
    for bad, param in [(dict(tools=[{"type": "function", "name": "f", "parameters": {}}]), "tools"),
                       (dict(previous_response_id="resp_1"), "previous_response_id")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=MODEL, input="hi", **bad)
        assert info.value.body["param"] == param
