"""The synchronous engine core: add requests, step, collect outputs. One thread owns it.

A step: schedule → pad and dispatch the model step → (while the device runs) build sampling tensors and
guided-decoding masks on the host → sample → detokenize, check stops, emit outputs. With async scheduling
(accelerators) the last part of one step runs while the next is already dispatched (`step`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine_setup import LoadedModel, load_engine_model
from jaxserve.kv_cache_manager import KVCacheManager
from jaxserve.model_runner import ModelRunner, StepInput
from jaxserve.outputs import RequestOutput
from jaxserve.request_state import RequestState
from jaxserve.sampler import SamplerFlags, SamplerOutput
from jaxserve.sampling_metadata import RowSamplingState, allowed_token_mask, build_sampling_tensors
from jaxserve.sampling_params import SamplingParams, bad_words_token_ids, truncate_prompt
from jaxserve.scheduler import Scheduler, SchedulerConfig, ScheduledSeq
from jaxserve.sequence import Sequence, request_options
from jaxserve.speculative import Draft, PromptLookup, SpeculationConfig
from jaxserve.speculative import eligible as speculation_eligible

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions_total: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_compilations: int
    spec_draft_tokens_total: int = 0  # prompt-lookup draft tokens computed, and those kept
    spec_accepted_tokens_total: int = 0


@dataclass
class _Launched:
    """A dispatched step whose tokens the host has not read yet (device arrays)."""

    scheduled: list[ScheduledSeq]
    drafts: dict[int, Draft]
    step: StepInput
    sampled: SamplerOutput
    next_tokens: jax.Array  # the sampled ids padded for the next step's token_src
    flags: SamplerFlags
    prompt_lp: dict
    pending_rows: dict[int, int]  # seq_id -> row, for the sequences whose token the next step may read


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        config = (config or EngineConfig()).replace(**kwargs) if kwargs else (config or EngineConfig())
        loaded: LoadedModel = load_engine_model(config)
        self.config = config = loaded.config  # the platform's batch limits filled in
        self.loaded = loaded
        self.model_config = loaded.model_config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids = loaded.eos_token_ids
        self.default_sampling = loaded.default_sampling  # what a request leaves unset (generation_config)
        self.runner: ModelRunner = loaded.runner
        self.kv_cache = KVCacheManager(loaded.runner.config.num_pages, config.block_size,
                                       config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len, config.scheduling_policy), self.kv_cache)
        # a decode step's rows, drafts included, stay within the compiled step shapes: the draft buckets
        # (BucketSet.draft_buckets), or max_num_seqs for a step with prompt chunks
        max_rows = min(config.speculative_max_rows, config.max_num_batched_tokens)
        self.speculation = PromptLookup(SpeculationConfig(
            config.num_speculative_tokens, max_rows, min_ngram=max(1, config.prompt_lookup_min),
            max_ngram=max(1, config.prompt_lookup_min, config.prompt_lookup_max)), self.max_model_len)
        self.requests: dict[str, RequestState] = {}
        self._rng = np.random.default_rng(config.seed)
        self._next_seq_id = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._guided = None
        # One step in flight (async scheduling), on one device of one host.
        self._async = config.async_scheduling and config.tensor_parallel_size == 1 and config.num_hosts == 1
        self._in_flight: _Launched | None = None
        self._steps_on_host: set[str] = set()  # ids of requests during which steps go one at a time
        if config.precompile:
            self.warmup_seconds = self.runner.precompile(
                self.runner.config.buckets.all_shapes(), [SamplerFlags(), SamplerFlags(all_greedy=False)])
            logger.info("compiled %d step shapes in %.1f s", len(self.runner.config.buckets.all_shapes()),
                        self.warmup_seconds)

    # ---- requests -------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        return None, [int(t) for t in prompt]

    def prompt_for(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """The prompt's text and token ids as the model gets them (truncate_prompt_tokens applied)."""
        prompt_text, prompt_ids = self.tokenize_prompt(prompt)
        kept = truncate_prompt(prompt_ids, params.truncate_prompt_tokens, self.max_model_len)
        if len(kept) < len(prompt_ids):
            return self.tokenizer.decode(kept), kept
        return prompt_text, prompt_ids

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> RequestState:
        """Validates and queues a request; raises ValueError with a user-facing message when invalid. `prompt`:
        text, token ids, or a dict of "prompt" and/or "prompt_token_ids" (and optionally "cache_salt" and, with
        the priority scheduling policy, "priority")."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        options = request_options(prompt)
        priority = self.check_priority(options.get("priority", 0))
        prompt_text, prompt_ids = self.prompt_for(prompt, params)
        if params.bad_words and params.bad_words_token_ids is None:
            params.bad_words_token_ids = bad_words_token_ids(
                params.bad_words, lambda text: self.tokenizer.encode(text, add_special_tokens=False))
        self.validate(prompt_ids, params)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        matchers = [self.guided_matcher(params) for _ in range(params.best_of or params.n)]
        state = RequestState(request_id, prompt_text, prompt_ids, params, max_tokens, self.tokenizer,
                             self.eos_token_ids, arrival_time or time.time())
        for index, matcher in enumerate(matchers):
            seed = (params.seed + index * 7919) if params.seed is not None else int(self._rng.integers(2**31))
            seq = Sequence(self._next_seq_id, request_id, index, prompt_ids, params, state.arrival_time, seed,
                           cache_salt=options.get("cache_salt"), priority=priority)
            self._next_seq_id += 1
            state.add_sequence(seq, matcher)
            self.scheduler.add(seq)
        self.requests[request_id] = state
        if state.needs_host_tokens or (self.speculation.config.num_tokens > 0 and speculation_eligible(params)):
            self._steps_on_host.add(request_id)  # its next step's inputs need its latest token on the host
        self.prompt_tokens_total += len(prompt_ids)
        return state

    def check_priority(self, priority) -> int:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError("priority needs priority scheduling: start the server with --scheduling-policy "
                             "priority.")
        return priority

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate(max_logprobs=self.config.max_logprobs, vocab_size=self.model_config.vocab_size)
        if not prompt_ids:
            raise ValueError("The prompt is empty: at least one token is required.")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"Token id out of vocabulary range [0, {vocab}) in the prompt.")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt has {len(prompt_ids)} tokens, leaving no room for the completion. Please reduce "
                "the length of the prompt.")
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_tokens} in the completion). Please reduce the length of the prompt or completion.")

    def guided_matcher(self, params: SamplingParams):
        if params.guided_decoding is None or not params.guided_decoding.constraint_kinds():
            return None
        if self._guided is None:
            from jaxserve.guided import GuidedDecodingCompiler

            self._guided = GuidedDecodingCompiler(self.tokenizer, self.model_config.vocab_size,
                                                  backend=self.config.guided_decoding_backend,
                                                  eos_token_ids=list(self.eos_token_ids))
        return self._guided.matcher_for(params.guided_decoding)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        self._steps_on_host.discard(request_id)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return state.abort_output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------------
    def step(self, dispatched: Callable[[], None] | None = None) -> list[RequestOutput]:
        """One engine step. With async scheduling the step dispatched here is usually read on the next call:
        the host reads and emits the previous step's tokens while this one runs, and the tokens it sampled
        feed this step on the device (`ModelRunner.prepare`'s token_src). `dispatched` is called once the
        step is on its way (or none was scheduled), before the host waits for anything: the server hands the
        previous step's outputs to its streams there, so that their Python runs beside the device's work
        instead of holding the GIL while this step is scheduled."""
        in_flight, self._in_flight = self._in_flight, None
        launched = self._launch(in_flight) if in_flight is None or self._may_overlap() else None
        if dispatched is not None:
            dispatched()
        outputs = self._collect(in_flight) if in_flight is not None else []
        if launched is not None:
            if not launched.drafts and self._may_overlap():
                self._in_flight = launched
            else:
                outputs += self._collect(launched)
        return outputs

    def _may_overlap(self) -> bool:
        """Whether the next step may be scheduled before the step in flight's tokens reach the host: not while a
        request needs them there first (guided decoding's masks, penalties' counts), and only with free pages
        enough that the scheduler cannot preempt (a preempted sequence would recompute from its tokens). A
        plain greedy request steps one at a time while speculation is on: its drafts need its latest token."""
        if not self._async:
            return False
        running = self.scheduler.num_running
        if self.kv_cache.num_free_pages < running + self.config.max_num_batched_tokens // self.kv_cache.page_size + 2:
            return False
        return not self._steps_on_host

    def _launch(self, in_flight: _Launched | None) -> _Launched | None:
        """Schedules and dispatches a step (the model, then the sampler) without waiting for it. Drafts only
        in a step that follows none in flight: a draft starts from the sequence's latest token."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return None
        scheduled, drafts = (out.scheduled, {}) if in_flight is not None else \
            self.speculation.add_drafts(out.scheduled, self.scheduler)
        step = self.runner.prepare(scheduled, in_flight.pending_rows if in_flight else None)
        # async dispatch: the host goes on meanwhile
        last_hidden, hidden = self.runner.execute(step, in_flight.next_tokens if in_flight else None)
        rows = [self._row_state(item.seq, item.samples) for item in scheduled]
        tensors, flags = build_sampling_tensors(rows, step.shape.num_seqs, self.model_config.vocab_size,
                                                self.config.max_logprobs)
        sampled, next_tokens = self.runner.sample(last_hidden, tensors, flags)
        prompt_lp = self._prompt_logprobs(scheduled, hidden, step.shape.num_tokens)
        self.scheduler.after_step(scheduled)
        pending_rows = {}  # sequences that may go on after this token: the next step can read it on the device
        if self._async and not drafts:
            for row in step.sample_rows:
                seq = scheduled[row].seq
                if self._may_follow(seq):
                    seq.num_pending_tokens += 1
                    pending_rows[seq.seq_id] = row
        return _Launched(scheduled, drafts, step, sampled, next_tokens, flags, prompt_lp, pending_rows)

    def _may_follow(self, seq: Sequence) -> bool:
        """False when the token being sampled is certainly the sequence's last (max_tokens, the context)."""
        state = self.requests.get(seq.request_id)
        if state is None or seq.is_finished:
            return False
        count = len(seq.output_token_ids) + seq.num_pending_tokens + 1  # outputs once this token is in
        return count < state.max_tokens and seq.num_tokens + 1 < self.max_model_len

    def _collect(self, launched: _Launched) -> list[RequestOutput]:
        """Waits for a dispatched step's tokens and records them: detokenize, check stops, emit outputs."""
        scheduled, drafts, step, sampled = launched.scheduled, launched.drafts, launched.step, launched.sampled
        for row in launched.pending_rows.values():
            scheduled[row].seq.num_pending_tokens -= 1
        token_ids = np.asarray(sampled.token_ids).tolist()  # Python ints: indexed per row below
        logprob = np.asarray(sampled.logprob).tolist() if launched.flags.token_logprob else [None] * len(token_ids)
        tops = None
        if launched.flags.num_logprobs:
            tops = (np.asarray(sampled.top_ids), np.asarray(sampled.top_logprobs), np.asarray(sampled.rank))
        outputs = []
        touched: dict[str, RequestState] = {}
        for row in step.sample_rows:
            seq = scheduled[row].seq
            state = self.requests.get(seq.request_id)
            if scheduled[row].draft_index or state is None or seq.is_finished:
                continue
            draft = drafts.get(row)
            kept = self.speculation.rows_to_keep(row, draft, token_ids)
            self.speculation.update(seq, draft, [token_ids[r] for r in kept])
            for i, r in enumerate(kept):
                if i:  # one output per token, as without drafts (streams send a chunk each)
                    if (output := state.make_output()) is not None:
                        outputs.append(output)
                top = None if tops is None else (tops[0][r], tops[1][r], tops[2][r])
                finished = state.append_token(seq, token_ids[r], logprob[r], top, self.max_model_len)
                self.generation_tokens_total += 1
                if finished:
                    self.scheduler.finish(seq, seq.finish_reason, seq.stop_reason)
                    break
            touched[state.request_id] = state
        for request_id, lps in launched.prompt_lp.items():
            if request_id in self.requests:
                touched[request_id] = self.requests[request_id]
        for state in touched.values():
            output = state.make_output()
            if output is not None:
                outputs.append(output)
            if state.finished:
                self.requests.pop(state.request_id, None)
                self._steps_on_host.discard(state.request_id)
        return outputs

    def _row_state(self, seq: Sequence, samples: bool) -> RowSamplingState:
        """The sampler's view of the sequence; kept between steps (its output list is the sequence's own,
        growing in place) unless a guided-decoding mask changes it every step."""
        row = seq.extra.get("row_state")
        if row is None:
            state = self.requests.get(seq.request_id)
            bitmask = state.bitmask_for(seq, self.model_config.vocab_size, samples) if state else None
            row = RowSamplingState(seq.sampling_params, seq.prompt_token_ids, seq.output_token_ids, seq.seed,
                                   bitmask, self.eos_token_ids,
                                   allowed_token_mask(seq.sampling_params, self.model_config.vocab_size))
            if state is not None and all(stream.matcher is None for stream in state.streams):
                seq.extra["row_state"] = row
        row.num_pending = seq.num_pending_tokens  # counted (the random stream's step, min_tokens), not read
        return row

    def _prompt_logprobs(self, scheduled: list[ScheduledSeq], hidden, num_tokens: int) -> dict:
        """Prompt logprobs for prefill chunks of requests that asked for them (rare: computed on demand)."""
        wanted = [(i, item) for i, item in enumerate(scheduled)
                  if item.seq.sampling_params.prompt_logprobs is not None and item.seq.index == 0
                  and item.seq.num_computed_tokens < item.seq.num_prompt_tokens]
        if not wanted:
            return {}
        targets = np.zeros(num_tokens, np.int32)
        cursor, spans = 0, []
        for i, item in enumerate(scheduled):
            seq, n = item.seq, item.num_new_tokens
            if any(i == j for j, _ in wanted):
                start = seq.num_computed_tokens
                nxt = seq.token_slice(start + 1, start + n + 1)
                targets[cursor:cursor + len(nxt)] = nxt
                spans.append((seq, cursor, start, min(n, seq.num_prompt_tokens - 1 - start)))
            cursor += n
        k = max(seq.sampling_params.prompt_logprobs for seq, *_ in spans)
        chosen, rank, top_ids, top_lp = map(np.asarray, self.runner.prompt_logprobs(hidden, targets, k))
        result = {}
        for seq, cursor, start, count in spans:
            state = self.requests.get(seq.request_id)
            if state is None:
                continue
            sl = slice(cursor, cursor + max(count, 0))
            state.add_prompt_logprobs(start, targets[sl], chosen[sl], rank[sl], top_ids[sl], top_lp[sl])
            result[seq.request_id] = True
        return result

    # ---- introspection --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_preemptions_total=self.scheduler.num_preemptions_total, kv_cache_usage=self.kv_cache.usage,
            prefix_cache_queries=self.kv_cache.stats.queries, prefix_cache_hits=self.kv_cache.stats.hits,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            num_compilations=self.loaded.compilation_counter.count,
            spec_draft_tokens_total=self.speculation.draft_tokens_total,
            spec_accepted_tokens_total=self.speculation.accepted_tokens_total)
