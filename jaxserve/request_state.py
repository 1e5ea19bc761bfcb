"""Per-request bookkeeping on the engine thread: detokenize, stop, collect logprobs, shape outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxserve.detokenizer import IncrementalDetokenizer
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.sequence import Sequence
from jaxserve.stop_checker import StopChecker


@dataclass
class StreamState:
    """One output stream's text, logprobs and how much of it was already handed out."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    matcher: object | None
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None  # kept where params.needs_token_logprob, as vLLM does
    sent_text: int = 0
    sent_tokens: int = 0
    sent_finish: bool = False


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, tokenizer, eos_token_ids, arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.arrival_time = arrival_time
        self.streams: list[StreamState] = []
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.prompt_logprobs_sent = 0
        self.first_token_time: float | None = None

    @property
    def seqs(self) -> list[Sequence]:
        return [s.seq for s in self.streams]

    @property
    def finished(self) -> bool:
        return all(s.seq.is_finished for s in self.streams)

    def add_sequence(self, seq: Sequence, matcher) -> None:
        p = self.params
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, p.skip_special_tokens,
                                       p.spaces_between_special_tokens)
        stop = StopChecker.from_sampling_params(p, self.eos_token_ids, self.max_tokens)
        self.streams.append(StreamState(seq, detok, stop, matcher,
                                        logprobs=[] if p.logprobs is not None else None,
                                        cumulative_logprob=0.0 if p.needs_token_logprob else None))

    @property
    def needs_host_tokens(self) -> bool:
        """Whether the next step's sampling inputs depend on this request's latest token values (guided
        decoding's masks, penalties' counts, bad words' prefixes): async scheduling then waits for them."""
        return (self.params.uses_penalties or bool(self.params.bad_words)
                or any(stream.matcher is not None for stream in self.streams))

    def bitmask_for(self, seq: Sequence, vocab_size: int, samples: bool) -> np.ndarray | None:
        """The guided-decoding mask for this step's sampled token (None when unconstrained or not sampling)."""
        stream = self.streams[seq.index]
        if stream.matcher is None or not samples:
            return None
        row = np.zeros(-(-vocab_size // 32), np.int32)
        stream.matcher.fill_bitmask(row)
        return row

    # ---- per sampled token ----------------------------------------------------------------------
    def append_token(self, seq: Sequence, token: int, logprob: float, top, max_model_len: int) -> bool:
        """Record a sampled token; returns True when the stream just finished."""
        import time

        stream = self.streams[seq.index]
        if self.first_token_time is None:
            self.first_token_time = time.time()
        seq.output_token_ids.append(token)
        if stream.cumulative_logprob is not None:
            stream.cumulative_logprob += logprob
        if stream.logprobs is not None:
            stream.logprobs.append(self._position_logprobs(stream, token, logprob, top))
        delta = stream.detokenizer.add_token(token)
        stream.text = stream.detokenizer.text
        decision = stream.stop_checker.check(token, len(seq.output_token_ids), stream.text, len(delta))
        grammar_done = False
        if stream.matcher is not None:
            stream.matcher.accept_token(token)
            grammar_done = stream.matcher.is_terminated()
        # A stream cut off inside a character (max_tokens, the context limit, a finished grammar) releases the
        # bytes the detokenizer held back, as U+FFFD like decode(output_ids); a stop token or string does not.
        flush = True
        if decision is not None:
            stream.text = decision.text
            seq.finish_reason, seq.stop_reason = decision.finish_reason, decision.stop_reason
            flush = decision.finish_reason == "length"
        elif grammar_done:
            seq.finish_reason = "stop"
        elif seq.num_known_tokens >= max_model_len:
            seq.finish_reason = "length"
        else:
            return False
        if flush:
            stream.text += stream.detokenizer.finish()
        return True

    def _position_logprobs(self, stream: StreamState, token: int, logprob: float, top) -> dict[int, Logprob]:
        decode = stream.detokenizer.decode_token
        if top is None:
            return {token: Logprob(logprob, None, decode(token))}
        top_ids, top_lps, rank = top
        entry = {token: Logprob(logprob, int(rank), decode(token))}
        for r, (tid, lp) in enumerate(zip(top_ids[: self.params.logprobs], top_lps[: self.params.logprobs])):
            entry.setdefault(int(tid), Logprob(float(lp), r + 1, decode(int(tid))))
        return entry

    def add_prompt_logprobs(self, start: int, targets, chosen, rank, top_ids, top_lp) -> None:
        decode = self.streams[0].detokenizer.decode_token
        k = self.params.prompt_logprobs
        # position start + i predicts prompt token start + i + 1
        while len(self.prompt_logprobs) < start + 1:
            self.prompt_logprobs.append(None)
        for i in range(len(targets)):
            tok = int(targets[i])
            entry = {tok: Logprob(float(chosen[i]), int(rank[i]), decode(tok))}
            for r in range(k):
                entry.setdefault(int(top_ids[i, r]), Logprob(float(top_lp[i, r]), r + 1, decode(int(top_ids[i, r]))))
            self.prompt_logprobs.append(entry)

    # ---- outputs --------------------------------------------------------------------------------
    def _visible_text_end(self, stream: StreamState) -> int:
        if stream.seq.is_finished or stream.seq.finish_reason is not None:
            return len(stream.text)
        return len(stream.text) - stream.stop_checker.holdback(stream.text)

    def make_output(self) -> RequestOutput | None:
        kind = self.params.output_kind
        finished = all(s.seq.finish_reason is not None for s in self.streams)
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        streams = self.streams
        if finished and len(streams) > self.params.n:
            streams = sorted(streams, key=lambda s: s.cumulative_logprob, reverse=True)[: self.params.n]
        elif len(streams) > self.params.n:
            return None  # best_of > n: only the final choice is reported
        outputs = []
        for out_index, stream in enumerate(streams):
            seq = stream.seq
            done = seq.finish_reason is not None
            end = self._visible_text_end(stream)
            if kind is RequestOutputKind.DELTA:
                if end == stream.sent_text and len(seq.output_token_ids) == stream.sent_tokens and \
                        (not done or stream.sent_finish):
                    continue
                text = stream.text[stream.sent_text:end]
                tokens = seq.output_token_ids[stream.sent_tokens:]
                logprobs = stream.logprobs[stream.sent_tokens:] if stream.logprobs is not None else None
            else:
                text, tokens, logprobs = stream.text[:end], list(seq.output_token_ids), stream.logprobs
            stream.sent_text, stream.sent_tokens = end, len(seq.output_token_ids)
            stream.sent_finish = done
            outputs.append(CompletionOutput(
                index=out_index if len(self.streams) > self.params.n else seq.index, text=text,
                token_ids=list(tokens), cumulative_logprob=stream.cumulative_logprob,
                logprobs=list(logprobs) if logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        prompt_logprobs = None
        if self.prompt_logprobs is not None:
            if kind is RequestOutputKind.DELTA:
                prompt_logprobs = self.prompt_logprobs[self.prompt_logprobs_sent:]
                self.prompt_logprobs_sent = len(self.prompt_logprobs)
            else:
                prompt_logprobs = list(self.prompt_logprobs)
        if not outputs and not finished and not prompt_logprobs:
            return None
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, finished,
                             prompt_logprobs, num_cached_tokens=self.streams[0].seq.num_cached_tokens)

    def abort_output(self) -> RequestOutput:
        for stream in self.streams:
            if stream.seq.finish_reason is None:
                stream.seq.finish_reason = "abort"
        outputs = [CompletionOutput(s.seq.index, "" if self.params.output_kind is RequestOutputKind.DELTA
                                    else s.text, [], s.cumulative_logprob, None, s.seq.finish_reason)
                   for s in self.streams[: self.params.n]]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, True)
