"""POST /v1/completions: prompts in, text out (whole, or streamed as server-sent events)."""
from __future__ import annotations

from typing import Any, AsyncIterator

from sanic import response

from jaxserve.outputs import RequestOutput
from jaxserve.server.errors import APIError, bad_request
from jaxserve.server.protocol import CompletionRequest
from jaxserve.server.responses import (SSE_DONE, CompletionChoice, CompletionChunk, CompletionLogProbs,
                                       CompletionResponse, now, random_id, sse)
from jaxserve.server.serving_common import (ChoiceState, MergedGenerations, ServingContext, clamp_logprob,
                                            logger, prompt_logprobs_json, resolve_max_tokens, stream_sse,
                                            token_text, top_ranked, validate_params)


def _prompts(ctx: ServingContext, request: CompletionRequest) -> list[tuple[str, list[int]]]:
    """Normalise the four prompt shapes to (text, token ids) pairs, one per prompt."""
    prompt = request.prompt
    if isinstance(prompt, str):
        raw: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        raw = [prompt]
    else:
        raw = list(prompt)
    if not raw:
        raise bad_request("prompt must not be empty.", "prompt")
    tokenizer, vocab = ctx.tokenizer, ctx.engine.model_config.vocab_size
    out = []
    for p in raw:
        if isinstance(p, str):
            ids = tokenizer.encode(p, add_special_tokens=request.add_special_tokens)
        else:
            if not p:
                raise bad_request("prompt token lists must not be empty.", "prompt")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab}).", "prompt")
            ids = list(p)
        if not ids:
            raise bad_request("prompt must contain at least one token.", "prompt")
        kept = request.truncated(ids, ctx.engine.max_model_len)
        # a truncated prompt is what the model saw, and what echo returns
        out.append((p if isinstance(p, str) and kept is ids else tokenizer.decode(kept), kept))
    return out


def _logprobs(ctx: ServingContext, token_ids: list[int], positions: list, k: int,
              offset: int, as_ids: bool = False) -> CompletionLogProbs:
    """The Completions API's logprobs: parallel lists, top alternatives as {token: logprob} (+ chosen)."""
    result = CompletionLogProbs()
    for tok, position in zip(token_ids, positions):
        chosen = position.get(tok) if position else None
        text = token_text(ctx.tokenizer, tok, chosen, as_ids)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        if position is None:  # the first prompt token has no logprob
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(clamp_logprob(chosen.logprob) if chosen else None)
        top = {token_text(ctx.tokenizer, t, lp, as_ids): clamp_logprob(lp.logprob) for t, lp in top_ranked(position, k)}
        if chosen is not None:
            top[text] = clamp_logprob(chosen.logprob)
        result.top_logprobs.append(top)
    return result


async def create_completion(ctx: ServingContext, request: CompletionRequest, http_request):
    model = ctx.check_model(request.model)
    prompts = _prompts(ctx, request)
    params = []
    requested = 1 if request.echo_only else request.max_tokens
    for text, ids in prompts:
        max_tokens = resolve_max_tokens(ctx.engine.max_model_len, len(ids), requested, "prompt", ctx.default_sampling)
        p = request.to_sampling_params(max_tokens, ctx.default_sampling)
        validate_params(ctx, p, request.guided_param)
        params.append(p)
    request_id = request.request_id or random_id("cmpl")
    for i, ((text, ids), p) in enumerate(zip(prompts, params)):
        ctx.log_request(f"{request_id}-{i}", text, p)
    engine_prompts = [request.engine_prompt(text, ids) for text, ids in prompts]
    gens = MergedGenerations(ctx, engine_prompts, params, request_id, request.guided_param)
    try:
        await gens.first()
        if request.stream:
            await stream_sse(http_request, _stream(ctx, request, model, request_id, prompts, gens))
            return None
        return await _complete(ctx, request, model, request_id, prompts, gens)
    finally:
        await gens.close()


async def _complete(ctx, request: CompletionRequest, model: str, request_id: str, prompts, gens):
    n = request.n
    states = [ChoiceState(i) for i in range(len(prompts) * n)]
    prompt_lps: dict[int, list] = {}
    async for prompt_index, out in gens:
        if out.prompt_logprobs is not None:
            prompt_lps.setdefault(prompt_index, out.prompt_logprobs)
        for delta in out.outputs:
            states[prompt_index * n + delta.index].add(delta)
    choices = []
    for state in states:
        prompt_index = state.index // n
        prompt_text, prompt_ids = prompts[prompt_index]
        text, tokens, positions = _generated(request, state.text, state.token_ids, state.logprobs)
        generated_ids = list(tokens)
        if request.echo:
            text = prompt_text + text
            tokens = prompt_ids + tokens
            positions = list(prompt_lps.get(prompt_index) or [None] * len(prompt_ids)) + positions
        logprobs = None if request.logprobs is None else _logprobs(ctx, tokens, positions, request.logprobs, 0,
                                                                  ctx.tokens_as_ids(request))
        token_fields = ({"prompt_token_ids": prompt_ids, "token_ids": generated_ids} if request.return_token_ids
                        else {})
        choices.append(CompletionChoice(index=state.index, text=text, logprobs=logprobs,
                                        finish_reason=state.finish_reason, stop_reason=state.stop_reason,
                                        prompt_logprobs=prompt_logprobs_json(prompt_lps.get(prompt_index)),
                                        **token_fields))
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    completion_tokens = sum(len(s.token_ids) for s in states)
    body = CompletionResponse(id=request_id, created=now(), model=model, choices=choices,
                              usage=ctx.usage(prompt_tokens, completion_tokens, gens))
    return response.json(body.model_dump())


def _generated(request: CompletionRequest, text: str, tokens: list[int], positions: list):
    """What a choice shows of its generated text, tokens and logprobs: nothing when `echo_only`."""
    if request.echo_only:
        return "", [], []
    return text, list(tokens), list(positions or [])


async def _stream(ctx, request: CompletionRequest, model: str, request_id: str, prompts,
                  gens: MergedGenerations) -> AsyncIterator[str]:
    n, created = request.n, now()
    offsets = [0] * (len(prompts) * n)
    started = [False] * (len(prompts) * n)
    generated = [0] * (len(prompts) * n)  # completion tokens per choice
    prompt_lps: dict[int, list] = {}  # they come once per prompt, maybe before some choice's first token
    try:
        async for prompt_index, out in gens:
            prompt_text, prompt_ids = prompts[prompt_index]
            if out.prompt_logprobs is not None:
                prompt_lps.setdefault(prompt_index, out.prompt_logprobs)
            for delta in out.outputs:
                index = prompt_index * n + delta.index
                text, tokens, positions = _generated(request, delta.text, delta.token_ids, delta.logprobs)
                token_fields = {"token_ids": list(tokens)} if request.return_token_ids else {}
                if not started[index]:
                    started[index] = True
                    if request.return_token_ids:
                        token_fields["prompt_token_ids"] = prompt_ids
                    if request.echo:
                        text = prompt_text + text
                        tokens = prompt_ids + tokens
                        positions = list(prompt_lps.get(prompt_index) or [None] * len(prompt_ids)) + positions
                generated[index] += len(delta.token_ids)
                logprobs = None
                if request.logprobs is not None:
                    logprobs = _logprobs(ctx, tokens, positions, request.logprobs, offsets[index],
                                         ctx.tokens_as_ids(request))
                offsets[index] += len(text)
                if not text and delta.finish_reason is None and not tokens:
                    continue
                usage = (ctx.usage(len(prompt_ids), generated[index], gens, prompt_index)
                         if request.continuous_usage_in_stream else None)
                chunk = CompletionChunk(id=request_id, created=created, model=model, usage=usage, choices=[
                    CompletionChoice(index=index, text=text, logprobs=logprobs,
                                     finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
                                     **token_fields)])
                yield chunk.to_sse()
    except APIError as err:
        yield sse(err.to_dict())
    except Exception:
        logger.exception("request %s failed while streaming", request_id)
        yield sse(APIError(f"Internal error in request {request_id}.", 500).to_dict())
    if request.include_usage_in_stream:
        usage = ctx.usage(sum(len(ids) for _, ids in prompts), sum(generated), gens)
        yield CompletionChunk(id=request_id, created=created, model=model, choices=[], usage=usage).to_sse()
    yield SSE_DONE
