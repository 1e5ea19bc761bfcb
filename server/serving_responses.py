"""POST /v1/responses: OpenAI's Responses API for text, on top of the chat path.

`input` (a string, or message items whose content is a string or input_text / output_text parts) and
`instructions` become chat messages and go through the chat template; `max_output_tokens`, `temperature`,
`top_p`, `text.format` (text / json_object / json_schema) and `top_logprobs` map to the chat request's fields,
vLLM's sampling extras (top_k, min_p, ...) pass through. The answer is one assistant message of output_text,
whole or as the API's typed stream of events. What needs state or tools this server does not keep
(previous_response_id, background, built-in or function tools) is refused with a 400 naming the parameter;
`store` is accepted and nothing is stored.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator, Literal

from pydantic import Field, ValidationError
from sanic import response

from jaxserve.server.errors import APIError, bad_request, from_validation_error
from jaxserve.server.protocol import ChatCompletionRequest, OpenAIModel
from jaxserve.server.responses import now
from jaxserve.server.serving_chat import _chat_logprobs
from jaxserve.server.serving_common import (ChoiceState, MergedGenerations, ServingContext, logger,
                                            resolve_max_tokens, stream_sse, validate_params)

# Fields of a Responses request that become the chat request's fields of the same meaning.
_SAMPLING_EXTRAS = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
                    "stop", "ignore_eos", "min_tokens", "skip_special_tokens", "logit_bias", "request_id",
                    "chat_template_kwargs", "bad_words", "cache_salt", "priority")


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(OpenAIModel):
    format: TextFormat | None = None


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    truncation: str | None = None

    def refuse_unsupported(self) -> None:
        if self.tools:
            raise bad_request("tools are not supported by this server's Responses API; use "
                              "/v1/chat/completions for tool calls.", "tools")
        if self.previous_response_id:
            raise bad_request("previous_response_id: this server stores no responses; send the whole "
                              "conversation as input.", "previous_response_id")
        if self.background:
            raise bad_request("background responses are not supported.", "background")
        if self.truncation not in (None, "disabled"):
            raise bad_request("truncation must be 'disabled': prompts longer than the context are refused.",
                              "truncation")

    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None or "message.output_text.logprobs" in (self.include or [])

    def messages(self) -> list[dict[str, Any]]:
        """`instructions` and `input` as chat messages."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind != "message" or "role" not in item:
                raise bad_request(f"input[{i}]: items of type {kind!r} are not supported (only messages).", "input")
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") not in ("input_text", "output_text", "text"):
                        raise bad_request(f"input[{i}]: content parts of type {part.get('type')!r} are not "
                                          f"supported (only text).", "input")
                    parts.append({"type": "text", "text": part.get("text", "")})
                content = parts
            elif not isinstance(content, str):
                raise bad_request(f"input[{i}]: content must be a string or a list of text parts.", "input")
            out.append({"role": item["role"], "content": content})
        if not out:
            raise bad_request("input must hold at least one message.", "input")
        return out

    def to_chat(self) -> ChatCompletionRequest:
        fields: dict[str, Any] = {"model": self.model, "messages": self.messages(), "stream": self.stream,
                                  "max_tokens": self.max_output_tokens, "temperature": self.temperature,
                                  "top_p": self.top_p, "user": self.user}
        if self.wants_logprobs():
            fields.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_object":
            fields["response_format"] = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise bad_request("text.format of type json_schema needs a schema.", "text")
            fields["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name or "response",
                                                                                "schema": fmt.schema_}}
        extra = self.model_extra or {}
        fields.update({k: extra[k] for k in _SAMPLING_EXTRAS if k in extra})
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as exc:  # a passed-through extra of the wrong type: the client's mistake
            raise from_validation_error(exc)


def _text_format(request: ResponsesRequest) -> dict:
    fmt = request.text.format if request.text and request.text.format else TextFormat()
    return fmt.model_dump(by_alias=True, exclude_none=True)


class _Reply:
    """One response's ids, its request's echo fields, and the JSON shapes built from them."""

    def __init__(self, request: ResponsesRequest, model: str, request_id: str):
        self.request, self.model = request, model
        self.id, self.message_id = request_id, f"msg_{uuid.uuid4().hex}"
        self.created = now()

    def message(self, text: str, status: str, logprobs: list | None) -> dict:
        part = {"type": "output_text", "text": text, "annotations": []}
        if logprobs is not None:
            part["logprobs"] = logprobs
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [part] if text or status != "in_progress" else []}

    def body(self, status: str, output: list, usage: dict | None, finish: str | None = None) -> dict:
        r = self.request
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": incomplete, "instructions": r.instructions,
                "max_output_tokens": r.max_output_tokens, "model": self.model, "output": output,
                "parallel_tool_calls": r.parallel_tool_calls is not False, "temperature": r.temperature,
                "top_p": r.top_p, "top_logprobs": r.top_logprobs, "tool_choice": r.tool_choice or "auto",
                "tools": [], "text": {"format": _text_format(r)}, "truncation": "disabled", "store": False,
                "metadata": r.metadata or {}, "user": r.user, "usage": usage}


def _usage(prompt_tokens: int, output_tokens: int, cached: int = 0) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def _logprobs_json(ctx: ServingContext, request: ResponsesRequest, token_ids: list[int], positions: list) -> list:
    content = _chat_logprobs(ctx, token_ids, positions, request.top_logprobs or 0).content or []
    return [c.model_dump() for c in content]


def _status(finish: str | None) -> str:
    return "completed" if finish in ("stop", None) else "incomplete"


async def create_response(ctx: ServingContext, request: ResponsesRequest, http_request):
    request.refuse_unsupported()
    chat = request.to_chat()
    model = ctx.check_model(chat.model)
    prompt_text = ctx.renderer.render(chat.messages, chat_template_kwargs=chat.chat_template_kwargs,
                                      add_generation_prompt=True)
    prompt_ids = ctx.tokenizer.encode(prompt_text, add_special_tokens=False)
    max_tokens = resolve_max_tokens(ctx.engine.max_model_len, len(prompt_ids), chat.requested_max_tokens, "input",
                                    ctx.default_sampling)
    params = chat.to_sampling_params(max_tokens, defaults=ctx.default_sampling)
    guided_param = "text" if chat.guided_param else None  # text.format asked for it
    validate_params(ctx, params, guided_param)
    request_id = chat.request_id or f"resp_{uuid.uuid4().hex}"
    ctx.log_request(request_id, prompt_text, params)
    gens = MergedGenerations(ctx, [chat.engine_prompt(prompt_text, prompt_ids)], [params], request_id,
                             guided_param)
    reply = _Reply(request, model, request_id)
    try:
        await gens.first()
        if request.stream:
            await stream_sse(http_request, _stream(ctx, reply, len(prompt_ids), gens))
            return None
        state = ChoiceState(0)
        cached = 0
        async for _, out in gens:
            cached = max(cached, out.num_cached_tokens)
            for delta in out.outputs:
                state.add(delta)
        logprobs = _logprobs_json(ctx, request, state.token_ids, state.logprobs) if request.wants_logprobs() else None
        status = _status(state.finish_reason)
        body = reply.body(status, [reply.message(state.text, status, logprobs)],
                          _usage(len(prompt_ids), len(state.token_ids), cached), state.finish_reason)
        return response.json(body)
    finally:
        await gens.close()


def _event(kind: str, sequence: int, **fields) -> str:
    data = {"type": kind, "sequence_number": sequence, **fields}
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(ctx: ServingContext, reply: _Reply, prompt_len: int,
                  gens: MergedGenerations) -> AsyncIterator[str]:
    """The Responses API's typed events, in its order: created, in_progress, the message item and its
    output_text part added, text deltas, then everything done and the response completed (or incomplete)."""
    request, seq = reply.request, iter(range(1 << 62))
    ids = {"item_id": reply.message_id, "output_index": 0, "content_index": 0}
    yield _event("response.created", next(seq), response=reply.body("in_progress", [], None))
    yield _event("response.in_progress", next(seq), response=reply.body("in_progress", [], None))
    yield _event("response.output_item.added", next(seq), output_index=0,
                 item=reply.message("", "in_progress", None))
    yield _event("response.content_part.added", next(seq), **ids,
                 part={"type": "output_text", "text": "", "annotations": []})
    state, all_logprobs, cached = ChoiceState(0), [], 0
    try:
        async for _, out in gens:
            cached = max(cached, out.num_cached_tokens)
            for delta in out.outputs:
                state.add(delta)
                logprobs = (_logprobs_json(ctx, request, delta.token_ids, delta.logprobs or [])
                            if request.wants_logprobs() else [])
                all_logprobs.extend(logprobs)
                if delta.text or logprobs:
                    yield _event("response.output_text.delta", next(seq), **ids, delta=delta.text, logprobs=logprobs)
    except APIError as err:
        yield _event("error", next(seq), code=str(err.status), message=err.message, param=err.param)
        return
    except Exception:
        logger.exception("response %s failed while streaming", reply.id)
        yield _event("error", next(seq), code="500", message=f"Internal error in response {reply.id}.", param=None)
        return
    logprobs = all_logprobs if request.wants_logprobs() else None
    status = _status(state.finish_reason)
    message = reply.message(state.text, status, logprobs)
    yield _event("response.output_text.done", next(seq), **ids, text=state.text, logprobs=all_logprobs)
    yield _event("response.content_part.done", next(seq), **ids, part=message["content"][0])
    yield _event("response.output_item.done", next(seq), output_index=0, item=message)
    final = reply.body(status, [message], _usage(prompt_len, len(state.token_ids), cached), state.finish_reason)
    yield _event("response.completed" if status == "completed" else "response.incomplete", next(seq),
                 response=final)
