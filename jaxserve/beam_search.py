"""Beam search over the engine's ordinary one-token requests, as vLLM's OpenAI server runs it.

Each round asks the engine for one greedy token with the top 2 x beam_width log-probabilities for every live
beam (a beam's prompt is the request's prompt plus the beam's tokens, so the prefix cache serves all but
the newest tokens). Every (beam, token) candidate is scored; candidates ending in EOS or a stop token are set
aside as finished, and the best beam_width of the rest go on. At the end the finished candidates and the
live beams compete together, best first. The score is vLLM's: cumulative log-probability over
(prompt + generated tokens, without a final EOS) ** length_penalty.

`BeamSearch` is the bookkeeping alone (plain Python); `beam_search` drives it over an async engine and
`run_beam_search` over a synchronous LLMEngine (the offline `LLM.beam_search`).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from jaxserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.sequence import request_options


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams, plus the request fields that still mean something under beam search."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # accepted for vLLM's sake: the candidates come from log-probabilities alone
    length_penalty: float = 1.0
    early_stopping: bool = False  # stop once beam_width candidates have finished
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # report per-token log-probabilities (the top 2 x beam_width are known)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # keep a finishing stop token's text

    def validate(self, *, max_logprobs: int = 20, vocab_size: int | None = None) -> None:
        """Raise ValueError(message) naming the offending parameter."""
        if self.beam_width < 1:
            raise ValueError(f"n (the beam width) must be at least 1, got {self.beam_width}.")
        if 2 * self.beam_width > max_logprobs:
            raise ValueError(f"n (the beam width) must be at most {max_logprobs // 2} with use_beam_search "
                             f"(each round reads the top 2 x n log-probabilities), got {self.beam_width}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= max_logprobs:
                raise ValueError(f"Requested {name} of {value}, which is greater than max allowed: {max_logprobs}")
        for tok in self.stop_token_ids:
            if vocab_size is not None and not 0 <= tok < vocab_size:
                raise ValueError(f"stop_token_ids: token id {tok} out of vocabulary range.")

    def step_params(self, prompt_logprobs: int | None = None) -> SamplingParams:
        """One round's request for one beam: a greedy token and the top 2 x beam_width alternatives."""
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * self.beam_width, ignore_eos=True,
                              prompt_logprobs=prompt_logprobs, output_kind=RequestOutputKind.FINAL_ONLY)


@dataclass
class Beam:
    tokens: list[int]  # generated so far
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | None = None


class BeamSearch:
    """One request's beams: `live` to extend, `advance` with each live beam's next-token log-probabilities,
    `done`, then `best()`."""

    def __init__(self, prompt_token_ids: Sequence[int], params: BeamSearchParams, eos_token_ids: Iterable[int],
                 prompt: dict | None = None):
        self.prompt_token_ids = list(prompt_token_ids)
        self.options = request_options(prompt)  # the request's cache_salt and priority, for every round
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.live: list[Beam] = [Beam([])]
        self.finished: list[Beam] = []
        self.rounds = 0
        self.prompt_logprobs = None  # from the first round's request, when asked for

    @property
    def done(self) -> bool:
        p = self.params
        return (not self.live or self.rounds >= p.max_tokens
                or (p.early_stopping and len(self.finished) >= p.beam_width))

    def score(self, beam: Beam) -> float:
        length = len(self.prompt_token_ids) + len(beam.tokens)
        if beam.finish_reason == "stop" and beam.stop_reason is None:  # a final EOS does not count
            length -= 1
        return beam.cumulative_logprob / (max(length, 1) ** self.params.length_penalty)

    def _ends(self, token: int) -> tuple[str, int | None] | None:
        """("stop", stop_reason) if `token` finishes a candidate."""
        if token in self.params.stop_token_ids:
            return "stop", token
        if token in self.eos_token_ids and not self.params.ignore_eos:
            return "stop", None
        return None

    def advance(self, next_logprobs: Sequence[PositionLogprobs]) -> None:
        """`next_logprobs[i]`: token -> Logprob after live beam i. Keeps the best beam_width unfinished.
        Before min_tokens, finishing tokens are no candidates (the sampler masks them likewise)."""
        candidates = []
        for beam, position in zip(self.live, next_logprobs, strict=True):
            for token, lp in position.items():
                end = self._ends(token)
                if end is not None and len(beam.tokens) + 1 < self.params.min_tokens:
                    continue
                child = Beam(beam.tokens + [token], beam.cumulative_logprob + lp.logprob,
                             beam.logprobs + [position])
                if end is not None:
                    child.finish_reason, child.stop_reason = end
                    self.finished.append(child)
                else:
                    candidates.append(child)
        candidates.sort(key=self.score, reverse=True)
        self.live = candidates[: self.params.beam_width]
        self.rounds += 1

    def round_requests(self) -> list[tuple[dict, SamplingParams]]:
        """This round's engine request (prompt, params) for each live beam, in order."""
        asked = self.params.prompt_logprobs if self.rounds == 0 else None
        return [({"prompt_token_ids": self.prompt_token_ids + beam.tokens, **self.options},
                 self.params.step_params(asked)) for beam in self.live]

    def advance_outputs(self, outputs: Sequence[RequestOutput | None]) -> None:
        """`advance` with the finished outputs of round_requests(), in order."""
        outputs = [_checked(out) for out in outputs]
        if self.rounds == 0:
            self.prompt_logprobs = outputs[0].prompt_logprobs
        self.advance([out.outputs[0].logprobs[0] for out in outputs])

    def best(self) -> list[Beam]:
        """The beam_width best of the finished candidates and the live beams (which end by length)."""
        for beam in self.live:
            beam.finish_reason = "length"
        ranked = sorted(self.finished + self.live, key=self.score, reverse=True)
        return ranked[: self.params.beam_width]

    def output(self, request_id: str, prompt: str | None, decode: Callable[[list[int]], str]) -> RequestOutput:
        outputs = []
        for index, beam in enumerate(self.best()):
            shown = beam.tokens
            if beam.finish_reason == "stop" and not (beam.stop_reason is not None
                                                     and self.params.include_stop_str_in_output):
                shown = beam.tokens[:-1]
            outputs.append(CompletionOutput(
                index=index, text=decode(shown), token_ids=list(beam.tokens),
                cumulative_logprob=beam.cumulative_logprob,
                logprobs=beam.logprobs if self.params.logprobs is not None else None,
                finish_reason=beam.finish_reason, stop_reason=beam.stop_reason))
        return RequestOutput(request_id, prompt, self.prompt_token_ids, outputs, finished=True,
                             prompt_logprobs=self.prompt_logprobs)


def _checked(out: RequestOutput | None) -> RequestOutput:
    if out is None or not out.outputs or not out.outputs[0].logprobs:
        raise RuntimeError("a beam search round ended without its token (aborted)")
    return out


def _decoder(tokenizer, params: BeamSearchParams) -> Callable[[list[int]], str]:
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=params.skip_special_tokens)


async def beam_search(engine, prompt: dict, params: BeamSearchParams, request_id: str,
                      eos_token_ids: Iterable[int]) -> AsyncIterator[RequestOutput]:
    """Yields one finished RequestOutput. `engine` streams requests (`generate`, as AsyncLLMEngine); a
    cancelled caller cancels the round in flight, whose requests abort in the engine."""
    search = BeamSearch(prompt["prompt_token_ids"], params, eos_token_ids, prompt)

    async def last_output(step: dict, step_params: SamplingParams, rid: str) -> RequestOutput | None:
        last = None
        async for out in engine.generate(step, step_params, rid):
            last = out
        return last

    while not search.done:
        search.advance_outputs(await asyncio.gather(*(
            last_output(step, step_params, f"{request_id}-r{search.rounds}-{i}")
            for i, (step, step_params) in enumerate(search.round_requests()))))
    yield search.output(request_id, prompt.get("prompt"), _decoder(engine.tokenizer, params))


def run_beam_search(engine, prompts: Sequence[dict], params: BeamSearchParams,
                    request_prefix: str) -> list[RequestOutput]:
    """Beam search for several prompts at once on a synchronous LLMEngine: each round's requests of every
    prompt are stepped together."""
    searches = [BeamSearch(p["prompt_token_ids"], params, engine.eos_token_ids, p) for p in prompts]
    while not all(s.done for s in searches):
        pending = {}
        for k, search in enumerate(searches):
            if search.done:
                continue
            for i, (step, step_params) in enumerate(search.round_requests()):
                rid = f"{request_prefix}-{k}-r{search.rounds}-{i}"
                engine.add_request(rid, step, step_params)
                pending[rid] = (k, i)
        results: dict[tuple[int, int], RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in pending:
                    results[pending[out.request_id]] = out
        for k, search in enumerate(searches):
            if not search.done:
                search.advance_outputs([results.get((k, i)) for i in range(len(search.live))])
    decode = _decoder(engine.tokenizer, params)
    return [s.output(f"{request_prefix}-{k}", prompts[k].get("prompt"), decode) for k, s in enumerate(searches)]
