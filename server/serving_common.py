"""What both serving paths share: the serving context, prompt length checks, and running generations
(several at once, merged, timed for /metrics, aborted in the engine when the client goes away)."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from jaxserve.beam_search import BeamSearchParams, beam_search
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.errors import APIError, bad_request, not_found
from jaxserve.server.responses import UsageInfo

logger = logging.getLogger("jaxserve.server")

# JSON has no -inf; OpenAI-compatible servers report impossible tokens with this floor instead.
LOGPROB_FLOOR = -9999.0


@dataclass
class ServingContext:
    """Everything a handler needs, built once per app."""
    engine: Any
    served_model_names: tuple[str, ...]
    renderer: Any  # ChatTemplateRenderer
    metrics: Any  # ServerMetrics
    response_role: str = "assistant"
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False
    log_requests: bool = True
    max_log_len: int | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def usage(self, prompt_tokens: int, completion_tokens: int, gens: "MergedGenerations",
              prompt_index: int | None = None) -> UsageInfo:
        """A response's usage (or one prompt's); with --enable-prompt-tokens-details, the prompt tokens the prefix
        cache served."""
        cached = None
        if self.enable_prompt_tokens_details:
            ids = gens.request_ids if prompt_index is None else [gens.request_ids[prompt_index]]
            cached = sum(gens.cached_tokens[rid] for rid in ids)
        return UsageInfo.of(prompt_tokens, completion_tokens, cached)

    @property
    def default_sampling(self) -> dict:
        """The model's generation_config.json defaults for what a request leaves unset (--generation-config)."""
        return getattr(self.engine, "default_sampling", None) or {}

    def tokens_as_ids(self, request) -> bool:
        """Whether a request's logprob tokens are spelled "token_id:{id}" (the request decides, else the flag)."""
        asked = request.return_tokens_as_token_ids
        return self.return_tokens_as_token_ids if asked is None else asked

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, requested: str | None) -> str:
        if not requested:  # absent, null or "" mean the default model, as in vLLM
            return self.model_name
        if requested in self.served_model_names:
            return requested
        raise not_found(f"The model `{requested}` does not exist.", "model")

    def max_logprobs(self) -> int:
        config = getattr(self.engine, "engine_config", None) or getattr(self.engine, "config", None)
        return getattr(config, "max_logprobs", 20)

    def log_request(self, request_id: str, prompt: Any, params: SamplingParams) -> None:
        if not self.log_requests:
            return
        shown = prompt if isinstance(prompt, str) else repr(prompt)
        if self.max_log_len is not None:
            shown = shown[: self.max_log_len]
        logger.info("Received request %s: prompt: %r, params: %s", request_id, shown, params)


def resolve_max_tokens(max_model_len: int, prompt_len: int, requested: int | None, what: str,
                       defaults: dict | None = None) -> int:
    """The completion's token limit. `requested` None = up to the context limit (or the model's
    generation_config default, `defaults`' max_tokens, when smaller); a request past the room the prompt leaves
    is capped to it, as vLLM caps it (the completion then ends with finish_reason "length"). A 400 giving the
    token counts only for a prompt that leaves no room, or max_tokens beyond the whole context."""
    if requested is not None and requested < 1:
        raise bad_request(f"max_tokens must be at least 1, got {requested}.", "max_tokens")
    if prompt_len >= max_model_len:  # whatever max_tokens says
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
                       f"has {prompt_len} tokens, leaving no room for a completion. Please reduce the length of "
                       f"the {what}.", 400, what.split()[0])
    if requested is not None and requested > max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{requested} tokens for the completion alone ({prompt_len} in the {what}). Please reduce "
                       f"max_tokens.", 400, "max_tokens")
    room = max_model_len - prompt_len
    if requested is not None:
        return min(requested, room)
    return min(room, (defaults or {}).get("max_tokens", max_model_len))


def validate_params(ctx: ServingContext, params: SamplingParams, guided_param: str | None = None) -> None:
    """`guided_param`: the request's parameter that asked for guided decoding (its constraint's errors name it)."""
    try:
        params.validate(max_logprobs=ctx.max_logprobs(), vocab_size=ctx.engine.model_config.vocab_size)
    except ValueError as exc:
        raise bad_request(str(exc), _param_named_in(str(exc), guided_param))
    for tok in params.stop_token_ids or []:
        if not 0 <= tok < ctx.engine.model_config.vocab_size:
            raise bad_request(f"stop_token_ids: token id {tok} out of vocabulary range.", "stop_token_ids")


_GUIDED_ERROR_PARAMS = {"Invalid regex": "guided_regex", "Invalid JSON schema": "guided_json",
                        "Invalid GBNF grammar": "guided_grammar", "Invalid Lark grammar": "guided_grammar",
                        "Invalid grammar": "guided_grammar"}


def _param_named_in(message: str, guided_param: str | None = None) -> str | None:
    for prefix, param in _GUIDED_ERROR_PARAMS.items():
        if message.startswith(prefix):
            return guided_param or param
    word = message.split(" ", 1)[0].strip(":")
    if word == "Requested":  # "Requested logprobs of 30, which is greater than max allowed"
        word = message.split(" ")[1]
    return word if word.replace("_", "").isalpha() and word.islower() else None


@dataclass
class ChoiceState:
    """One choice's accumulated output while its deltas arrive."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class _Timing:
    arrival: float
    first: float | None = None
    last: float | None = None
    gaps: list[float] = field(default_factory=list)


_DONE = object()


class MergedGenerations:
    """Runs one engine request per prompt and yields `(prompt_index, RequestOutput)` as they come.

    `first()` awaits the first output so that the engine's ValueError (bad schema, ...) becomes a 400
    before any response byte is sent. `close()` aborts every request that has not finished — a client
    that disconnects cancels the handler, whose `finally` calls it, which frees the KV pages.
    """

    def __init__(self, ctx: ServingContext, prompts: list[Any], params: list[SamplingParams],
                 request_id: str, guided_param: str | None = None):
        self.ctx = ctx
        self.guided_param = guided_param  # what a guided-decoding error names (see validate_params)
        self.request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self.unfinished = set(self.request_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timing = {rid: _Timing(time.monotonic()) for rid in self.request_ids}
        self.cached_tokens = dict.fromkeys(self.request_ids, 0)  # each prompt's tokens from the prefix cache
        self.tasks = [asyncio.ensure_future(self._pump(i, rid, prompt, p))
                      for i, (rid, prompt, p) in enumerate(zip(self.request_ids, prompts, params))]
        self._pending_first: tuple[int, RequestOutput] | None = None
        self._live = len(self.tasks)

    def _generate(self, prompt: Any, params: SamplingParams | BeamSearchParams, rid: str):
        engine = self.ctx.engine
        if isinstance(params, BeamSearchParams):
            eos = getattr(engine, "eos_token_ids", None) or engine.model_config.eos_token_ids
            return beam_search(engine, prompt, params, rid, eos)
        return engine.generate(prompt, params, rid)

    async def _pump(self, index: int, rid: str, prompt: Any, params: SamplingParams | BeamSearchParams) -> None:
        try:
            async for out in self._generate(prompt, params, rid):
                await self.queue.put((index, out))
        except Exception as exc:  # handed to the consumer, which decides 400 vs 500
            await self.queue.put((index, exc))
        finally:
            await self.queue.put((index, _DONE))

    async def _next(self) -> tuple[int, RequestOutput] | None:
        while self._live:
            index, item = await self.queue.get()
            if item is _DONE:
                self._live -= 1
                continue
            if isinstance(item, Exception):
                if isinstance(item, ValueError):
                    raise bad_request(str(item), _param_named_in(str(item), self.guided_param))
                raise item
            self._record(item)
            return index, item
        return None

    def _record(self, out: RequestOutput) -> None:
        timing = self.timing[out.request_id]
        self.cached_tokens[out.request_id] = max(self.cached_tokens[out.request_id], out.num_cached_tokens)
        t = time.monotonic()
        new_tokens = sum(len(o.token_ids) for o in out.outputs)
        if new_tokens:
            if timing.first is None:
                timing.first = t
            elif timing.last is not None:
                timing.gaps.extend([(t - timing.last) / new_tokens] * new_tokens)
            timing.last = t
        if out.finished:
            self.unfinished.discard(out.request_id)
            reasons = [o.finish_reason for o in out.outputs if o.finish_reason] or ["stop"]
            self.ctx.metrics.observe_finished(
                ttft=None if timing.first is None else timing.first - timing.arrival,
                tpot=timing.gaps, e2e=t - timing.arrival, reason=reasons[-1])

    async def first(self) -> None:
        self._pending_first = await self._next()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if self._pending_first is not None:
            item, self._pending_first = self._pending_first, None
            yield item
        while (item := await self._next()) is not None:
            yield item

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for rid in list(self.unfinished):
            self.unfinished.discard(rid)
            self.ctx.metrics.observe_aborted()
            try:
                await asyncio.shield(self.ctx.engine.abort(rid))
            except asyncio.CancelledError:
                pass  # the shielded abort still runs to completion
            except Exception:
                logger.exception("aborting %s failed", rid)


def token_text(tokenizer, token_id: int, logprob, as_id: bool = False) -> str:
    if as_id:
        return f"token_id:{token_id}"
    if logprob is not None and getattr(logprob, "decoded_token", None) is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def prompt_logprobs_json(positions) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: logprob, rank, text}."""
    if positions is None:
        return None
    return [None if p is None else {str(t): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
                                             "decoded_token": lp.decoded_token} for t, lp in p.items()}
            for p in positions]


def top_ranked(position: dict, k: int) -> list[tuple[int, Any]]:
    """The k most likely entries of one position's logprobs, most likely first."""
    items = sorted(position.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                    -kv[1].logprob))
    return items[:k]


async def stream_sse(http_request, events: AsyncIterator[str]) -> None:
    """Send server-sent events as they are produced (one write per event, never buffered)."""
    response = await http_request.respond(
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async for event in events:
        await response.send(event)
    await response.eof()
