"""POST /v1/chat/completions: messages through the chat template, replies whole or streamed."""
from __future__ import annotations

import json
from typing import AsyncIterator

from sanic import response

from jaxserve.server.chat_template import conversation_from_messages
from jaxserve.server.chat_tools import ToolMode, guided_tool_calls, tool_call_out, tool_mode_for
from jaxserve.server.errors import APIError
from jaxserve.server.protocol import ChatCompletionRequest
from jaxserve.server.reasoning import ReasoningStream, split_reasoning
from jaxserve.server.responses import (SSE_DONE, ChatChoice, ChatCompletionChunk, ChatCompletionResponse,
                                       ChatLogprobContent, ChatLogprobs, ChatMessageOut, ChatStreamChoice,
                                       DeltaMessage, TopLogprob, now, random_id, sse)
from jaxserve.server.serving_common import (ChoiceState, MergedGenerations, ServingContext, clamp_logprob,
                                            logger, prompt_logprobs_json, resolve_max_tokens, stream_sse,
                                            token_text, top_ranked, validate_params)


def _chat_logprobs(ctx: ServingContext, token_ids: list[int], positions: list, k: int,
                   as_ids: bool = False) -> ChatLogprobs:
    """The Chat API's logprobs: one entry per token with its bytes and the k most likely tokens."""
    content = []
    for tok, position in zip(token_ids, positions):
        chosen = position.get(tok)
        text = token_text(ctx.tokenizer, tok, chosen, as_ids)
        top = []
        for alt, lp in top_ranked(position, k):
            alt_text = token_text(ctx.tokenizer, alt, lp, as_ids)
            top.append(TopLogprob(token=alt_text, logprob=clamp_logprob(lp.logprob),
                                  bytes=list(alt_text.encode("utf-8"))))
        content.append(ChatLogprobContent(token=text, logprob=clamp_logprob(chosen.logprob) if chosen else
                                          -9999.0, bytes=list(text.encode("utf-8")), top_logprobs=top))
    return ChatLogprobs(content=content)


def _echo_text(request: ChatCompletionRequest, role: str) -> str:
    """vLLM's chat `echo`: the last message's content, when it is in the reply's own role."""
    if not request.echo:
        return ""
    last = conversation_from_messages(request.messages[-1:])[0]
    return last["content"] if last["role"] == role else ""


async def create_chat_completion(ctx: ServingContext, request: ChatCompletionRequest, http_request):
    model = ctx.check_model(request.model)
    tools = tool_mode_for(request, ctx.enable_auto_tool_choice, ctx.tool_call_parser, ctx.tokenizer)
    prompt_text = ctx.renderer.render(
        request.messages, chat_template=request.chat_template,
        chat_template_kwargs=request.chat_template_kwargs,
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message, tools=request.tools,
        documents=request.documents)
    prompt_ids = ctx.tokenizer.encode(prompt_text, add_special_tokens=request.add_special_tokens)
    kept = request.truncated(prompt_ids, ctx.engine.max_model_len)
    if kept is not prompt_ids:
        prompt_text, prompt_ids = ctx.tokenizer.decode(kept), kept
    max_tokens = resolve_max_tokens(ctx.engine.max_model_len, len(prompt_ids), request.requested_max_tokens,
                                    "messages", ctx.default_sampling)
    params = request.to_sampling_params(max_tokens, tools.guided, ctx.default_sampling)
    guided_param = request.guided_param or ("tools" if tools.guided is not None else None)
    validate_params(ctx, params, guided_param)
    # a constrained answer (guided decoding, forced tool calls) has no room to think: all of it is content
    reasoning = ctx.reasoning_parser if getattr(params, "guided_decoding", None) is None else None
    request_id = request.request_id or random_id("chatcmpl")
    ctx.log_request(request_id, prompt_text, params)
    role = ctx.response_role if request.add_generation_prompt else request.messages[-1].role
    gens = MergedGenerations(ctx, [request.engine_prompt(prompt_text, prompt_ids)], [params], request_id,
                             guided_param)
    try:
        await gens.first()
        if request.stream:
            await stream_sse(http_request, _stream(ctx, request, model, request_id, role, prompt_ids,
                                                   tools, gens, reasoning))
            return None
        return await _complete(ctx, request, model, request_id, role, prompt_ids, tools, gens, reasoning)
    finally:
        await gens.close()


def _final_message(ctx, request, role: str, tools: ToolMode, text: str, finish: str | None,
                   reasoning: str | None = None):
    """(message, finish_reason) for a finished choice: its reasoning split off (with a reasoning parser), tool
    calls extracted from the rest as the mode says."""
    if reasoning:
        thinking, answer = split_reasoning(reasoning, text)
        message, finish = _final_message(ctx, request, role, tools, answer or "", finish)
        if answer is None and not message.tool_calls:
            message.content = _echo_text(request, role) or None  # still thinking when it stopped
        message.reasoning_content = thinking if request.include_reasoning else None
        return message, finish
    if tools.kind == "guided":
        calls = guided_tool_calls(text, request)
        if calls:  # a truncated forced answer parses to no call: it is returned as content, "length"
            return ChatMessageOut(role=role, content="", tool_calls=[tool_call_out(c) for c in calls]), \
                _forced_finish(request, finish)
    elif tools.kind == "auto":
        content, calls = tools.new_parser(ctx.tokenizer).extract_tool_calls(text)
        if calls:
            return ChatMessageOut(role=role, content=content or None,
                                  tool_calls=[tool_call_out(c) for c in calls]), "tool_calls"
    return ChatMessageOut(role=role, content=_echo_text(request, role) + text), finish


def _forced_finish(request: ChatCompletionRequest, finish: str | None) -> str | None:
    """As OpenAI and vLLM: a named function's call ends with "stop", "required" calls with "tool_calls"."""
    return "tool_calls" if finish == "stop" and request.effective_tool_choice == "required" else finish


async def _complete(ctx, request, model, request_id, role, prompt_ids, tools, gens, reasoning=None):
    states = [ChoiceState(i) for i in range(request.n)]
    prompt_logprobs = None
    async for _, out in gens:
        prompt_logprobs = prompt_logprobs or out.prompt_logprobs
        for delta in out.outputs:
            states[delta.index].add(delta)
    choices = []
    for state in states:
        message, finish = _final_message(ctx, request, role, tools, state.text, state.finish_reason, reasoning)
        logprobs = (_chat_logprobs(ctx, state.token_ids, state.logprobs, request.top_logprobs or 0,
                                   ctx.tokens_as_ids(request))
                    if request.logprobs else None)
        choices.append(ChatChoice(index=state.index, message=message, logprobs=logprobs,
                                  finish_reason=finish, stop_reason=state.stop_reason,
                                  token_ids=list(state.token_ids) if request.return_token_ids else None))
    completion_tokens = sum(len(s.token_ids) for s in states)
    body = ChatCompletionResponse(id=request_id, created=now(), model=model, choices=choices,
                                  usage=ctx.usage(len(prompt_ids), completion_tokens, gens), prompt_logprobs=None,
                                  prompt_token_ids=prompt_ids if request.return_token_ids else None)
    data = body.model_dump()
    if request.prompt_logprobs is not None:
        data["prompt_logprobs"] = prompt_logprobs_json(prompt_logprobs)
    return response.json(data)


def _parser_delta(raw: dict) -> DeltaMessage:
    calls = []
    for call in raw.get("tool_calls") or []:
        call = dict(call)
        function = dict(call.get("function") or {})
        if function.get("arguments") is not None and not isinstance(function["arguments"], str):
            function["arguments"] = json.dumps(function["arguments"], ensure_ascii=False)
        calls.append({**call, "function": function})
    return DeltaMessage(content=raw.get("content"), tool_calls=calls or None)


async def _stream(ctx, request: ChatCompletionRequest, model: str, request_id: str, role: str,
                  prompt_ids: list[int], tools: ToolMode, gens: MergedGenerations,
                  reasoning: str | None = None) -> AsyncIterator[str]:
    created = now()
    states = [ChoiceState(i) for i in range(request.n)]
    prompt_len = len(prompt_ids)

    def chunk(index: int, delta: DeltaMessage, logprobs=None, finish=None, stop_reason=None, token_ids=None,
              with_prompt_ids: bool = False) -> str:
        usage = (ctx.usage(prompt_len, len(states[index].token_ids), gens)
                 if request.continuous_usage_in_stream else None)
        return ChatCompletionChunk(
            id=request_id, created=created, model=model, usage=usage,
            prompt_token_ids=prompt_ids if with_prompt_ids and request.return_token_ids else None,
            choices=[ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish,
                                      stop_reason=stop_reason,
                                      token_ids=token_ids if request.return_token_ids else None)]).to_sse()

    echo = _echo_text(request, role)
    for i in range(request.n):  # the role comes first, in a delta of its own, like OpenAI
        yield chunk(i, DeltaMessage(role=role, content=""), with_prompt_ids=i == 0)
        if echo:
            yield chunk(i, DeltaMessage(content=echo))
    parsers = [tools.new_parser(ctx.tokenizer) for _ in states] if tools.kind == "auto" else []
    called_tools = [False] * request.n
    thinkers = [ReasoningStream(reasoning) for _ in states] if reasoning else []
    answers = [""] * request.n  # each choice's text past its reasoning (all of it without a reasoning parser)
    try:
        async for _, out in gens:
            for delta in out.outputs:
                state = states[delta.index]
                state.add(delta)
                logprobs = (_chat_logprobs(ctx, delta.token_ids, delta.logprobs or [], request.top_logprobs or 0,
                                           ctx.tokens_as_ids(request))
                            if request.logprobs else None)
                finish = delta.finish_reason
                text, thought = delta.text, None
                if thinkers:
                    thought, text = thinkers[delta.index].add(delta.text, final=finish is not None)
                    text, thought = text or "", thought if request.include_reasoning else None
                previous_answer = answers[delta.index]
                answers[delta.index] += text
                if tools.kind == "guided":
                    message = DeltaMessage()
                    if finish is not None:  # the constrained text is complete: send the calls whole
                        calls = guided_tool_calls(state.text, request)
                        if calls:
                            message = DeltaMessage(tool_calls=[tool_call_out(c, i) for i, c in enumerate(calls)])
                            finish = _forced_finish(request, finish)
                        else:
                            message = DeltaMessage(content=state.text)
                elif tools.kind == "auto":
                    raw = parsers[delta.index].extract_tool_calls_streaming(previous_answer, answers[delta.index], text)
                    message = _parser_delta(raw) if raw else DeltaMessage()
                    called_tools[delta.index] |= bool(message.tool_calls)
                    if finish == "stop" and called_tools[delta.index]:
                        finish = "tool_calls"
                else:  # "" rather than no content when the last token adds no text, as vLLM
                    message = DeltaMessage(content=text if text or not thinkers else None)
                message.reasoning_content = thought
                if (not message.content and not thought and message.tool_calls is None and finish is None
                        and not logprobs and not (request.return_token_ids and delta.token_ids)):
                    continue
                yield chunk(delta.index, message, logprobs, finish, delta.stop_reason, list(delta.token_ids))
    except APIError as err:
        yield sse(err.to_dict())
    except Exception:
        logger.exception("request %s failed while streaming", request_id)
        yield sse(APIError(f"Internal error in request {request_id}.", 500).to_dict())
    if request.include_usage_in_stream:
        usage = ctx.usage(prompt_len, sum(len(s.token_ids) for s in states), gens)
        yield ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                  usage=usage).to_sse()
    yield SSE_DONE
