"""The HTTP API over a fake engine (in-process server, official openai client): completions formats,
streaming, errors, auth, CORS, body limits, disconnects, tokenize, metrics."""
import asyncio
import contextlib
import json
import random

import httpx
import openai
import pytest

from fake_engine import FakeAsyncEngine, load_default_tokenizer
from server_utils import serve_in_process

from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.server.app import attach_engine, build_app
from jaxserve.server.server_config import ServerConfig


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


@contextlib.asynccontextmanager
async def running(engine, config=None):
    app = build_app(engine, config or ServerConfig())
    async with serve_in_process(app) as url:
        yield url


@pytest.fixture
async def fake(tokenizer):
    engine = FakeAsyncEngine(tokenizer)
    async with running(engine) as url:
        yield url, engine


def client(url, key="none"):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def sse_events(url, path, body, headers=None):
    """Raw SSE lines of one streaming request (to check the wire format itself)."""
    async with httpx.AsyncClient(timeout=30) as h:
        async with h.stream("POST", url + path, json=body, headers=headers) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            return [line async for line in resp.aiter_lines() if line]


async def test_completion_shape_and_usage(fake, tokenizer):
    url, _ = fake
    prompt = "The capital of France is"
    r = await client(url).completions.create(model="fake-model", prompt=prompt, max_tokens=7, seed=1)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "fake-model"
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7


async def test_prompt_shapes_and_choice_indices(fake, tokenizer):
    url, engine = fake
    c = client(url)
    ids = tokenizer.encode("Hello there")
    r = await c.completions.create(model="fake-model", prompt=["a b", "c d e"], max_tokens=2, n=2, seed=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(tokenizer.encode("a b")) + len(tokenizer.encode("c d e"))
    assert r.usage.completion_tokens == 8
    r = await c.completions.create(model="fake-model", prompt=ids, max_tokens=2)
    assert engine.seen_prompts[-1]["prompt_token_ids"] == ids and r.usage.prompt_tokens == len(ids)
    r = await c.completions.create(model="fake-model", prompt=[ids, ids[:1]], max_tokens=2, echo=True)
    assert r.choices[0].text.startswith("Hello there") and r.choices[1].text.startswith("Hello")


async def test_echo_and_completion_logprobs_format(fake, tokenizer):
    url, _ = fake
    prompt = "one two three"
    prompt_ids = tokenizer.encode(prompt)
    r = await client(url).completions.create(model="fake-model", prompt=prompt, max_tokens=4, logprobs=3,
                                             echo=True, seed=2)
    ch = r.choices[0]
    assert ch.text.startswith(prompt)
    lp = ch.logprobs
    n = len(prompt_ids) + 4
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == ch.text
    for i in range(n - 1):
        assert lp.text_offset[i + 1] - lp.text_offset[i] == len(lp.tokens[i])
    for token, top, value in zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:]):
        assert 3 <= len(top) <= 4 and top[token] == value  # the chosen token is always present


async def test_logprob_tokens_as_token_ids(fake, tokenizer):
    """vLLM's return_tokens_as_token_ids: "token_id:{id}" keeps tokens that are not valid UTF-8 apart."""
    url, _ = fake
    c = client(url)
    r = await c.completions.create(model="fake-model", prompt="one two", max_tokens=4, logprobs=2, seed=3,
                                   extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert all(t.startswith("token_id:") for t in lp.tokens) and tokenizer.decode(ids) == r.choices[0].text
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    assert lp.text_offset[1] - lp.text_offset[0] == len(lp.tokens[0])
    chat = await c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, logprobs=True, top_logprobs=2, seed=3,
                                           extra_body={"return_tokens_as_token_ids": True})
    content = chat.choices[0].logprobs.content
    assert content and all(e.token.startswith("token_id:") for e in content)
    assert all(t.token.startswith("token_id:") for e in content for t in e.top_logprobs)
    plain = await c.completions.create(model="fake-model", prompt="one two", max_tokens=4, logprobs=2, seed=3)
    assert plain.choices[0].logprobs.tokens == [tokenizer.decode([i]) for i in ids]


async def test_streaming_completion_wire_format(fake):
    url, _ = fake
    body = {"model": "fake-model", "prompt": "Hi", "max_tokens": 5, "stream": True, "seed": 4,
            "stream_options": {"include_usage": True}}
    lines = await sse_events(url, "/v1/completions", body)
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    text_chunks, usage = chunks[:-1], chunks[-1]
    assert len(text_chunks) == 5  # token by token
    assert [c["choices"][0]["finish_reason"] for c in text_chunks] == [None] * 4 + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    whole = await client(url).completions.create(model="fake-model", prompt="Hi", max_tokens=5, seed=4)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole.choices[0].text


async def test_streaming_n_choices_interleave(fake):
    url, _ = fake
    stream = await client(url).completions.create(model="fake-model", prompt="Hi", max_tokens=3, n=3,
                                                  stream=True, seed=5)
    seen, finished = [], {}
    async for chunk in stream:
        for ch in chunk.choices:
            seen.append(ch.index)
            if ch.finish_reason:
                finished[ch.index] = finished.get(ch.index, 0) + 1
    assert sorted(set(seen)) == [0, 1, 2] and finished == {0: 1, 1: 1, 2: 1}
    assert seen[:3] == [0, 1, 2]  # interleaved, not one choice after another


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "logprobs": 30}, "logprobs"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 600}, "max_tokens"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": [10**7]}, "prompt"),
    ({"prompt": "x", "use_beam_search": True, "n": 11}, "n"),
    ({"prompt": "x", "suffix": "!"}, "suffix"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"prompt": "x", "truncate_prompt_tokens": 513}, "truncate_prompt_tokens"),
    ({"prompt": "x", "bad_words": ["a"], "use_beam_search": True, "n": 2}, "bad_words"),
    ({"prompt": "x", "bad_words": [" "]}, "bad_words"),
    ({"prompt": "x", "logits_processors": ["my.module:Processor"]}, "logits_processors"),
    ({"prompt": "x", "cache_salt": ""}, "cache_salt"),
    ({"prompt": "x", "prompt_embeds": "AAAA"}, "prompt_embeds"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),  # OpenAI's (and vLLM's) range is [0, 2]
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),  # streams cannot carry them
    ({"prompt": [1] * 600, "max_tokens": 5}, "prompt"),  # the prompt alone is too long, not max_tokens
])
async def test_invalid_parameters_answer_400(fake, body, param):
    url, _ = fake
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "BadRequestError" and err["message"]


async def test_max_tokens_past_the_context_ends_the_completion_there(fake):
    """vLLM's answer to a prompt that leaves less room than max_tokens: the completion is capped at the
    context's end (finish_reason "length"), not refused."""
    url, _ = fake
    r = await client(url).completions.create(model="fake-model", prompt=[1] * 500, max_tokens=50)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 500 and r.usage.completion_tokens == 12


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"continue_final_message": True}, "continue_final_message"),  # with add_generation_prompt's default
    ({"temperature": 3}, "temperature"),
])
async def test_invalid_chat_parameters_name_their_param(fake, body, param):
    url, _ = fake
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/v1/chat/completions",
                         json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "BadRequestError"


@pytest.mark.parametrize("tools", [[], [{"type": "function"}], [{"type": "web_search"}],
                                   [{"type": "function", "function": {"name": "f", "parameters": "x"}}]])
async def test_empty_or_malformed_tools_are_400_even_with_tool_choice_none(fake, tools):
    url, _ = fake
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "tools": tools, "tool_choice": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


async def test_explicit_nulls_take_the_defaults(fake):
    """The openai client sends a None argument as null; OpenAI's optional parameters are nullable."""
    url, _ = fake
    c = client(url)
    messages = [{"role": "user", "content": "hi"}]
    r = await c.chat.completions.create(model="fake-model", messages=messages, max_tokens=2, n=None, stream=None,
                                        logprobs=None, extra_body={"ignore_eos": None, "priority": None})
    assert len(r.choices) == 1 and r.choices[0].logprobs is None and r.usage.completion_tokens == 2
    r = await c.completions.create(model="fake-model", prompt="Hi", max_tokens=2, n=None, stream=None, echo=None)
    assert len(r.choices) == 1 and not r.choices[0].text.startswith("Hi")


async def test_empty_stream_options_send_no_usage_chunk(fake):
    url, _ = fake
    for path, body in (("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        lines = await sse_events(url, path, {"model": "fake-model", "max_tokens": 3, "stream": True,
                                             "stream_options": {}, **body})
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert all(c["choices"] and "usage" not in c for c in chunks), chunks  # include_usage unset: none


async def test_malformed_json_and_client_error_types(fake):
    url, _ = fake
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/v1/completions", content=b'{"prompt": ')
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = await h.post(url + "/v1/completions", content=b"[1, 2]")
        assert r.status_code == 400
    with pytest.raises(openai.BadRequestError) as err:
        await client(url).completions.create(model="fake-model", prompt="x", max_tokens=1000)
    assert "maximum context length is 512" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        await client(url).completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.NotFoundError):
        await client(url).models.retrieve("gpt-4")
    assert (await client(url).models.retrieve("fake-model")).id == "fake-model"


def refusing_guided(tokenizer, message: str) -> FakeAsyncEngine:
    """A fake engine whose guided requests fail with `message`, as the real one's bad constraints do."""
    class RefusingEngine(FakeAsyncEngine):
        async def generate(self, prompt, params, request_id):
            if params.guided_decoding is not None:
                raise ValueError(message)
            async for out in super().generate(prompt, params, request_id):
                yield out

    return RefusingEngine(tokenizer)


async def test_engine_value_error_is_a_400_streaming_or_not(tokenizer):
    async with running(refusing_guided(tokenizer, "guided_json: invalid JSON schema")) as url:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                await client(url).completions.create(model="fake-model", prompt="x", stream=stream,
                                                     extra_body={"guided_json": {"type": "object"}})
            assert "invalid JSON schema" in str(err.value)


async def test_a_bad_constraint_names_the_parameter_the_request_used(tokenizer):
    bad = {"type": "foo"}
    schema_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}
    cases = [
        ("/v1/chat/completions", {"response_format": schema_format}, "response_format"),
        ("/v1/chat/completions", {"structured_outputs": {"json": bad}}, "structured_outputs"),
        ("/v1/chat/completions", {"guided_json": bad}, "guided_json"),
        ("/v1/completions", {"structured_outputs": {"json": bad}}, "structured_outputs"),
        ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": bad}}}, "text"),
    ]
    inputs = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
              "/v1/completions": {"prompt": "hi"}, "/v1/responses": {"input": "hi"}}
    engine = refusing_guided(tokenizer, "Invalid JSON schema: Invalid type: foo")
    async with running(engine) as url, httpx.AsyncClient() as h:
        for path, body, param in cases:
            r = await h.post(url + path, json={"model": "fake-model", **inputs[path], **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)


async def test_api_key_guards_api_routes_only(tokenizer):
    async with running(FakeAsyncEngine(tokenizer), ServerConfig(api_key="sekrit")) as url:
        with pytest.raises(openai.AuthenticationError):
            await client(url, "wrong").models.list()
        assert (await client(url, "sekrit").models.list()).data[0].id == "fake-model"
        async with httpx.AsyncClient() as h:
            assert (await h.post(url + "/v1/completions", json={"prompt": "x"})).status_code == 401
            assert (await h.post(url + "/tokenize", json={"prompt": "x"})).status_code == 401
            for open_path in ("/health", "/ping", "/metrics", "/version"):
                assert (await h.get(url + open_path)).status_code == 200


async def test_oversized_body_is_413(tokenizer):
    async with running(FakeAsyncEngine(tokenizer), ServerConfig(max_request_bytes=2000)) as url:
        host, port = url[len("http://"):].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b" " * 500)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413")
        assert json.loads(body)["error"]["code"] == 413
        async with httpx.AsyncClient() as h:  # the server is fine afterwards
            assert (await h.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200


async def test_health_is_503_until_an_engine_is_ready(tokenizer):
    app = build_app(None, ServerConfig())
    async with serve_in_process(app) as url, httpx.AsyncClient() as h:
        assert (await h.get(url + "/health")).status_code == 503
        r = await h.post(url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        engine = FakeAsyncEngine(tokenizer)
        engine.ready = False
        attach_engine(app, engine)
        assert (await h.get(url + "/health")).status_code == 503
        engine.ready = True
        assert (await h.get(url + "/health")).status_code == 200
        assert (await h.get(url + "/ping")).status_code == 200 and (await h.post(url + "/ping")).status_code == 200
        engine.error = RuntimeError("Gloo AllGather failed")  # what a dead engine thread leaves behind
        r = await h.get(url + "/health")
        assert r.status_code == 503 and "stopped after an error" in r.json()["error"]["message"]
        assert (await h.get(url + "/ping")).status_code == 503


async def test_disconnects_abort_the_engine_request(tokenizer):
    engine = FakeAsyncEngine(tokenizer, step_delay=0.02)
    async with running(engine) as url, httpx.AsyncClient(timeout=30) as h:
        async with h.stream("POST", url + "/v1/completions",
                            json={"prompt": "x", "max_tokens": 300, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    break  # leave after the first chunk
        task = asyncio.create_task(h.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 300}))
        for _ in range(100):  # cancel only once the request is in the engine (a loaded CI box can be slow)
            if any(rid.startswith("chatcmpl") for rid in engine.running):
                break
            await asyncio.sleep(0.05)
        assert any(rid.startswith("chatcmpl") for rid in engine.running), "the chat request never reached the engine"
        task.cancel()
        for _ in range(50):
            if len(engine.aborted) == 2 and not engine.running:
                break
            await asyncio.sleep(0.1)
        assert len(engine.aborted) == 2 and not engine.running
        metrics = (await h.get(url + "/metrics")).text
        assert 'jaxserve:request_aborted_total{model_name="fake-model"} 2.0' in metrics
        assert 'jaxserve:num_requests_running{model_name="fake-model"} 0.0' in metrics


async def test_metrics_report_engine_stats_and_latencies(fake):
    url, _ = fake
    await client(url).completions.create(model="fake-model", prompt="x", max_tokens=3)
    async with httpx.AsyncClient() as h:
        text = (await h.get(url + "/metrics")).text
    for name in ("jaxserve:num_requests_waiting", "jaxserve:kv_cache_usage_perc", "jaxserve:prefix_cache_hit_rate",
                 "jaxserve:prompt_tokens_total", "jaxserve:generation_tokens_total", "jaxserve:xla_compilations_total",
                 "jaxserve:num_preemptions_total"):
        assert name in text, name
    assert 'jaxserve:time_to_first_token_seconds_count{model_name="fake-model"} 1.0' in text
    assert 'jaxserve:time_per_output_token_seconds_count{model_name="fake-model"} 2.0' in text
    assert 'jaxserve:request_success_total{finished_reason="length",model_name="fake-model"} 1.0' in text


async def test_tokenize_detokenize_models_version(fake, tokenizer):
    url, _ = fake
    async with httpx.AsyncClient() as h:
        r = (await h.post(url + "/tokenize", json={"prompt": "Hello world"})).json()
        assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == 512 and r["token_strs"] is None
        strs = (await h.post(url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True})).json()
        assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(r["tokens"])
        assert (await h.post(url + "/detokenize", json={"tokens": r["tokens"]})).json() == {"prompt": "Hello world"}
        chat = (await h.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
        assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
        assert (await h.post(url + "/detokenize", json={"tokens": [-1]})).status_code == 400
        assert "version" in (await h.get(url + "/version")).json()
    models = await client(url).models.list()
    assert [m.id for m in models.data] == ["fake-model"]


async def test_cors_and_root_path_and_served_names(tokenizer):
    config = ServerConfig(allowed_origins=("http://ok.example",), root_path="/proxy",
                          served_model_names=("alias-a", "alias-b"))
    async with running(FakeAsyncEngine(tokenizer), config) as url, httpx.AsyncClient() as h:
        pre = await h.options(url + "/v1/completions", headers={
            "Origin": "http://ok.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "http://ok.example"
        r = await h.get(url + "/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await h.get(url + "/proxy/v1/models", headers={"Origin": "http://ok.example"})
        assert [m["id"] for m in r.json()["data"]] == ["alias-a", "alias-b"]
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
    async with running(FakeAsyncEngine(tokenizer), ServerConfig(served_model_names=("a", "b"))) as url:
        r = await client(url).completions.create(model="b", prompt="x", max_tokens=1)
        assert r.model == "b"


async def test_truncate_prompt_tokens_keeps_the_last_tokens_and_bad_words_reach_the_engine(fake, tokenizer):
    url, engine = fake
    c = client(url)
    text = "one two three four five six seven eight"
    ids = tokenizer.encode(text)
    r = await c.completions.create(model="fake-model", prompt=text, max_tokens=2, echo=True,
                                   extra_body={"truncate_prompt_tokens": 3, "bad_words": ["nine"]})
    assert engine.seen_prompts[-1]["prompt_token_ids"] == ids[-3:] and r.usage.prompt_tokens == 3
    assert r.choices[0].text.startswith(tokenizer.decode(ids[-3:]))  # echo gives what the model saw
    assert engine.seen_params[-1].bad_words == ["nine"]
    await c.completions.create(model="fake-model", prompt=text, max_tokens=1, extra_body={"cache_salt": "t1"})
    assert engine.seen_prompts[-1]["cache_salt"] == "t1"
    r = await c.completions.create(model="fake-model", prompt=[ids, ids[:2]], max_tokens=1,
                                   extra_body={"truncate_prompt_tokens": 4})
    assert [p["prompt_token_ids"] for p in engine.seen_prompts[-2:]] == [ids[-4:], ids[:2]]
    assert r.usage.prompt_tokens == 6
    messages = [{"role": "user", "content": text}]
    whole = await c.chat.completions.create(model="fake-model", messages=messages, max_tokens=1)
    r = await c.chat.completions.create(model="fake-model", messages=messages, max_tokens=1,
                                        extra_body={"truncate_prompt_tokens": 5})
    assert whole.usage.prompt_tokens > 5 and r.usage.prompt_tokens == 5
    assert engine.seen_prompts[-1]["prompt_token_ids"] == engine.seen_prompts[-2]["prompt_token_ids"][-5:]


async def test_return_token_ids_whole_and_streamed(fake, tokenizer):
    url, engine = fake
    c = client(url)
    ids = tokenizer.encode("Hello there")
    r = await c.completions.create(model="fake-model", prompt="Hello there", max_tokens=4, n=2,
                                   extra_body={"return_token_ids": True})
    for choice in r.choices:
        assert choice.prompt_token_ids == ids and len(choice.token_ids) == 4
        assert tokenizer.decode(choice.token_ids) == choice.text
    plain = await c.completions.create(model="fake-model", prompt="Hello there", max_tokens=2)
    assert plain.choices[0].model_extra.get("token_ids") is None
    body = {"model": "fake-model", "prompt": "Hello there", "max_tokens": 5, "stream": True, "return_token_ids": True}
    chunks = [json.loads(line[6:]) for line in await sse_events(url, "/v1/completions", body)
              if line != "data: [DONE]"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == ids
    assert all("prompt_token_ids" not in ch["choices"][0] for ch in chunks[1:])
    streamed = [t for ch in chunks for t in ch["choices"][0]["token_ids"]]
    assert len(streamed) == 5 and tokenizer.decode(streamed) == "".join(ch["choices"][0]["text"] for ch in chunks)

    messages = [{"role": "user", "content": "Hi"}]
    r = await c.chat.completions.create(model="fake-model", messages=messages, max_tokens=3,
                                        extra_body={"return_token_ids": True})
    assert r.model_extra["prompt_token_ids"] == engine.seen_prompts[-1]["prompt_token_ids"]
    assert len(r.choices[0].token_ids) == 3
    assert tokenizer.decode(r.choices[0].token_ids) == r.choices[0].message.content
    body = {"model": "fake-model", "messages": messages, "max_tokens": 3, "stream": True, "return_token_ids": True}
    chunks = [json.loads(line[6:]) for line in await sse_events(url, "/v1/chat/completions", body)
              if line != "data: [DONE]"]
    assert chunks[0]["prompt_token_ids"] == engine.seen_prompts[-1]["prompt_token_ids"]
    assert "prompt_token_ids" not in chunks[1] and "token_ids" not in chunks[0]["choices"][0]
    assert len([t for ch in chunks for t in ch["choices"][0].get("token_ids", [])]) == 3


async def test_generation_config_defaults_fill_what_a_request_leaves_unset(tokenizer):
    engine = FakeAsyncEngine(tokenizer)
    engine.default_sampling = {"temperature": 0.25, "top_k": 7, "repetition_penalty": 1.1, "max_tokens": 5}
    async with running(engine) as url:
        c = client(url)
        messages = [{"role": "user", "content": "Hi"}]
        r = await c.chat.completions.create(model="fake-model", messages=messages)
        p = engine.seen_params[-1]
        assert (p.temperature, p.top_k, p.repetition_penalty, p.max_tokens, p.top_p) == (0.25, 7, 1.1, 5, 1.0)
        assert r.usage.completion_tokens == 5
        await c.chat.completions.create(model="fake-model", messages=messages, temperature=0.9, max_tokens=3,
                                        extra_body={"top_k": -1})
        p = engine.seen_params[-1]
        assert (p.temperature, p.top_k, p.max_tokens) == (0.9, -1, 3)  # what the request sets wins
        await c.completions.create(model="fake-model", prompt="Hello")
        assert engine.seen_params[-1].max_tokens == 16  # the Completions API's own default


async def test_echo_with_max_tokens_0_returns_the_prompt_alone(fake, tokenizer):
    """vLLM's prompt scoring (lm-eval's loglikelihood): echo, max_tokens 0, logprobs."""
    url, _ = fake
    prompt = "one two three"
    n = len(tokenizer.encode(prompt))
    r = await client(url).completions.create(model="fake-model", prompt=prompt, max_tokens=0, echo=True,
                                             logprobs=1)
    ch = r.choices[0]
    assert ch.text == prompt and len(ch.logprobs.tokens) == n and "".join(ch.logprobs.tokens) == prompt
    assert ch.logprobs.token_logprobs[0] is None and all(v is not None for v in ch.logprobs.token_logprobs[1:])
    assert r.usage.prompt_tokens == n
    body = {"model": "fake-model", "prompt": prompt, "max_tokens": 0, "echo": True, "stream": True}
    chunks = [json.loads(line[6:]) for line in await sse_events(url, "/v1/completions", body)
              if line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == prompt
    async with httpx.AsyncClient() as h:  # without echo, max_tokens 0 is still refused
        r = await h.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


async def test_completion_prompt_logprobs_are_returned(fake, tokenizer):
    url, _ = fake
    prompt = "one two three"
    async with httpx.AsyncClient() as h:
        r = (await h.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2,
                                                          "prompt_logprobs": 1})).json()
        plain = (await h.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2})).json()
    lps = r["choices"][0]["prompt_logprobs"]
    ids = tokenizer.encode(prompt)
    assert len(lps) == len(ids) and lps[0] is None
    for tok, position in zip(ids[1:], lps[1:]):
        assert str(tok) in position  # the prompt's own token, besides the top alternative
        assert all({"logprob", "rank", "decoded_token"} <= set(v) for v in position.values())
    assert plain["choices"][0]["prompt_logprobs"] is None


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
async def test_continuous_usage_stats_put_usage_in_every_chunk(fake, path, extra):
    url, _ = fake
    body = {**extra, "max_tokens": 3, "n": 2, "stream": True, "seed": 1,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = [json.loads(line[6:]) for line in await sse_events(url, path, body) if line != "data: [DONE]"]
    *choice_chunks, final = chunks
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
    prompt_tokens = final["usage"]["prompt_tokens"]
    seen = {0: 0, 1: 0}
    for c in choice_chunks:
        index, usage = c["choices"][0]["index"], c["usage"]
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
        assert usage["completion_tokens"] >= seen[index]  # this choice's tokens so far
        seen[index] = usage["completion_tokens"]
    assert seen == {0: 3, 1: 3}
    body["stream_options"] = {"include_usage": True}
    chunks = [json.loads(line[6:]) for line in await sse_events(url, path, body) if line != "data: [DONE]"]
    assert all("usage" not in c for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_small_request_details_match_vllm(fake):
    url, engine = fake
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/v1/completions", json={"model": "", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "fake-model"  # "" = the default model
        for bad in ({"allowed_token_ids": []}, {"seed": 1 << 64}):
            r = await h.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text
        health = await h.get(url + "/health")
        assert health.status_code == 200 and health.headers["content-type"] != "None"


async def test_custom_roles_reach_the_template_and_long_seeds_are_named(fake, tokenizer):
    url, _ = fake
    messages = [{"role": "narrator", "content": "x"}]
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/tokenize", json={"messages": messages})
        assert r.status_code == 200, r.text
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert r.json()["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    c = client(url)
    plain = await c.chat.completions.create(model="fake-model", messages=messages, max_tokens=3, seed=0)
    parts = await c.chat.completions.create(model="fake-model", max_tokens=3, seed=0, messages=[
        {"role": "narrator", "content": [{"type": "text", "text": "x"}]}])
    assert plain.choices[0].message.content == parts.choices[0].message.content
    for seed in (-(1 << 63) - 1, 1 << 63):  # vLLM's clients look for pydantic's error type
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model="fake-model", messages=messages, seed=seed)
        assert "greater_than_equal" in err.value.message or "less_than_equal" in err.value.message


class ScriptedEngine(FakeAsyncEngine):
    """Answers every request with `self.pieces`, one output each; the last ends with `self.finish`."""
    pieces, finish = [""], "stop"

    async def generate(self, prompt, params, request_id):
        for i, piece in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            ids = self.tokenizer.encode(piece, add_special_tokens=False) or [self.tokenizer.eos_token_id]
            yield RequestOutput(request_id, None, [1], [CompletionOutput(
                index=0, text=piece, token_ids=ids, finish_reason=self.finish if last else None)], last)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("tool_choice,text,finish,want_finish,want_calls", [
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Paris"}', "stop", "stop", 1),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Paris"}}]', "stop", "tool_calls", 1),
    ("required", '[{"name": "get_weather", "param', "length", "length", 0),  # cut off: text is content
])
async def test_forced_tool_calls_content_and_finish_reason(tokenizer, tool_choice, text, finish, want_finish,
                                                           want_calls):
    engine = ScriptedEngine(tokenizer)
    engine.pieces, engine.finish = [text], finish
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS, "tool_choice": tool_choice}
    async with running(engine) as url:
        r = await client(url).chat.completions.create(model="fake-model", **body)
        message, streamed = r.choices[0].message, await client(url).chat.completions.create(
            model="fake-model", stream=True, **body)
        chunks = [c.choices[0] async for c in streamed if c.choices]
    assert r.choices[0].finish_reason == want_finish and len(message.tool_calls) == want_calls
    assert message.content == ("" if want_calls else text)  # vLLM's "" beside forced calls
    assert [c.finish_reason for c in chunks if c.finish_reason] == [want_finish]
    assert "".join(c.delta.content or "" for c in chunks) == ("" if want_calls else text)
    streamed_calls = [t for c in chunks for t in c.delta.tool_calls or []]
    assert [t.function.arguments for t in streamed_calls] == [t.function.arguments for t in message.tool_calls]


async def test_chat_stream_final_chunk_has_empty_content_when_the_last_token_adds_none(tokenizer):
    engine = ScriptedEngine(tokenizer)
    engine.pieces = ["Hello", ""]  # as when the end-of-sequence token ends the reply
    async with running(engine) as url:
        stream = await client(url).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hi"}], stream=True)
        chunks = [c.choices[0] async for c in stream]
    assert [c.delta.content for c in chunks] == ["", "Hello", ""]  # vLLM's shape: never a missing content
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "Hi", "temperature": NaN}', "temperature"),
    (b'{"prompt": "Hi", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "\\ud800 lone half", "max_tokens": 1}', None),
    (b'{"prompt": "Hi", "logit_bias": {"99999999": 1}}', "logit_bias"),
    (b'{"prompt": "Hi", "allowed_token_ids": [99999999]}', "allowed_token_ids"),
])
async def test_unusable_values_are_400_not_500(fake, raw, param):
    url, _ = fake
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/v1/completions", content=raw)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        paired = '{"prompt": "\\ud83d\\ude00", "max_tokens": 1}'.encode()  # an escaped surrogate pair is fine
        assert (await h.post(url + "/v1/completions", content=paired)).status_code == 200


async def test_streamed_echo_logprobs_when_a_choice_starts_after_the_prompt_logprobs(tokenizer):
    class StaggeredEngine(FakeAsyncEngine):
        """Choice 0's first token comes with the prompt logprobs, choice 1's in the next output."""
        async def generate(self, prompt, params, request_id):
            ids = prompt["prompt_token_ids"]
            rng = random.Random(0)
            prompt_lps = [None] + [self._logprobs(t, params.prompt_logprobs, rng) for t in ids[1:]]
            for index in range(params.n):
                tok = self._words[index]
                yield RequestOutput(request_id, None, ids, [CompletionOutput(
                    index=index, text=tokenizer.decode([tok]), token_ids=[tok],
                    logprobs=[self._logprobs(tok, params.logprobs, rng)], finish_reason="length")],
                    index == params.n - 1, prompt_lps if index == 0 else None)

    async with running(StaggeredEngine(tokenizer)) as url:
        stream = await client(url).completions.create(model="fake-model", prompt="one two three", max_tokens=1,
                                                      n=2, echo=True, logprobs=1, stream=True)
        first_chunks = {}
        async for chunk in stream:
            first_chunks.setdefault(chunk.choices[0].index, chunk.choices[0])
    for choice in first_chunks.values():
        assert choice.logprobs.token_logprobs[0] is None
        assert all(v is not None for v in choice.logprobs.token_logprobs[1:]), choice.logprobs.token_logprobs


async def test_reasoning_parser_splits_thinking_from_the_answer(tokenizer):
    engine = ScriptedEngine(tokenizer)
    engine.pieces = ["<think>Two and", " two make</th", "ink>The answer", " is 4."]
    messages = [{"role": "user", "content": "2+2?"}]
    async with running(engine, ServerConfig(reasoning_parser="deepseek_r1")) as url:
        c = client(url)
        r = await c.chat.completions.create(model="fake-model", messages=messages)
        message = r.choices[0].message
        assert (message.reasoning_content, message.content) == ("Two and two make", "The answer is 4.")
        chunks = [ch async for ch in await c.chat.completions.create(model="fake-model", messages=messages,
                                                                        stream=True)]
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Two and two make"
        assert "".join(d.content or "" for d in deltas) == "The answer is 4."
        r = await c.chat.completions.create(model="fake-model", messages=messages,
                                            extra_body={"include_reasoning": False})
        assert r.choices[0].message.reasoning_content is None and r.choices[0].message.content == "The answer is 4."
        engine.pieces, engine.finish = ["Still", " thinking"], "length"
        r = await c.chat.completions.create(model="fake-model", messages=messages)
        assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Still thinking", None)
    async with running(engine) as url:  # without a parser the tags are content
        r = await client(url).chat.completions.create(model="fake-model", messages=messages)
        assert r.choices[0].message.content == "Still thinking" and r.choices[0].message.reasoning_content is None


async def test_responses_pass_vllms_request_options_on(fake):
    url, engine = fake
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/v1/responses", json={"model": "fake-model", "input": "Hi", "max_output_tokens": 3,
                                                     "cache_salt": "tenant-a", "bad_words": ["no"], "top_k": 5})
    assert r.status_code == 200, r.text
    assert engine.seen_prompts[-1]["cache_salt"] == "tenant-a"
    assert engine.seen_params[-1].bad_words == ["no"] and engine.seen_params[-1].top_k == 5


@pytest.mark.parametrize("extra,param", [({"top_k": "abc"}, "top_k"), ({"temperature": 3}, "temperature")])
async def test_responses_bad_passed_on_options_are_400(fake, extra, param):
    url, _ = fake
    async with httpx.AsyncClient() as h:
        r = await h.post(url + "/v1/responses", json={"model": "fake-model", "input": "Hi", **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
