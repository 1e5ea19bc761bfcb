"""The synchronous engine core: add requests, step, collect outputs. One thread owns it.

A step: schedule → pad and dispatch the model step → (while the device runs) build sampling tensors and
guided-decoding masks on the host → sample → detokenize, check stops, emit outputs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine_setup import LoadedModel, load_engine_model
from jaxserve.kv_cache_manager import KVCacheManager
from jaxserve.model_runner import ModelRunner
from jaxserve.outputs import RequestOutput
from jaxserve.request_state import RequestState
from jaxserve.sampler import SamplerFlags
from jaxserve.sampling_metadata import RowSamplingState, build_sampling_tensors
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler, SchedulerConfig, ScheduledSeq
from jaxserve.sequence import Sequence
from jaxserve.speculative import PromptLookup, SpeculationConfig

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
        self.runner: ModelRunner = loaded.runner
        self.kv_cache = KVCacheManager(loaded.runner.config.num_pages, config.block_size,
                                       config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len), self.kv_cache)
        # a decode step's rows, drafts included, stay within the compiled step shapes (max_num_seqs)
        max_rows = min(config.speculative_max_rows, config.max_num_seqs)
        self.speculation = PromptLookup(SpeculationConfig(
            config.num_speculative_tokens, max_rows, min_ngram=max(1, config.prompt_lookup_min),
            max_ngram=max(1, config.prompt_lookup_min, config.prompt_lookup_max)), self.max_model_len)
        self.requests: dict[str, RequestState] = {}
        self._rng = np.random.default_rng(config.seed)
        self._next_seq_id = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._guided = None
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

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> RequestState:
        """Validates and queues a request; raises ValueError with a user-facing message when invalid."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_text, prompt_ids = self.tokenize_prompt(prompt)
        self.validate(prompt_ids, params)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        matchers = [self.guided_matcher(params) for _ in range(params.best_of or params.n)]
        state = RequestState(request_id, prompt_text, prompt_ids, params, max_tokens, self.tokenizer,
                             self.eos_token_ids, arrival_time or time.time())
        for index, matcher in enumerate(matchers):
            seed = (params.seed + index * 7919) if params.seed is not None else int(self._rng.integers(2**31))
            seq = Sequence(self._next_seq_id, request_id, index, prompt_ids, params, state.arrival_time, seed)
            self._next_seq_id += 1
            state.add_sequence(seq, matcher)
            self.scheduler.add(seq)
        self.requests[request_id] = state
        self.prompt_tokens_total += len(prompt_ids)
        return state

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
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return state.abort_output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        scheduled, drafts = self.speculation.add_drafts(out.scheduled, self.scheduler)
        step = self.runner.prepare(scheduled)
        last_hidden, hidden = self.runner.execute(step)  # async dispatch: the host goes on meanwhile
        rows = [self._row_state(item.seq, item.samples) for item in scheduled]
        tensors, flags = build_sampling_tensors(rows, step.shape.num_seqs, self.model_config.vocab_size,
                                                self.config.max_logprobs)
        sampled = self.runner.sample(last_hidden, tensors, flags)
        prompt_lp = self._prompt_logprobs(scheduled, hidden, step.shape.num_tokens)
        self.scheduler.after_step(scheduled)
        token_ids = np.asarray(sampled.token_ids)
        logprob = np.asarray(sampled.logprob)
        tops = None
        if flags.num_logprobs:
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
            self.speculation.update(seq, draft, [int(token_ids[r]) for r in kept])
            for i, r in enumerate(kept):
                if i:  # one output per token, as without drafts (streams send a chunk each)
                    if (output := state.make_output()) is not None:
                        outputs.append(output)
                top = None if tops is None else (tops[0][r], tops[1][r], tops[2][r])
                finished = state.append_token(seq, int(token_ids[r]), float(logprob[r]), top, self.max_model_len)
                self.generation_tokens_total += 1
                if finished:
                    self.scheduler.finish(seq, seq.finish_reason, seq.stop_reason)
                    break
            touched[state.request_id] = state
        for request_id, lps in prompt_lp.items():
            if request_id in self.requests:
                touched[request_id] = self.requests[request_id]
        for state in touched.values():
            output = state.make_output()
            if output is not None:
                outputs.append(output)
            if state.finished:
                self.requests.pop(state.request_id, None)
        return outputs

    def _row_state(self, seq: Sequence, samples: bool) -> RowSamplingState:
        state = self.requests.get(seq.request_id)
        bitmask = state.bitmask_for(seq, self.model_config.vocab_size, samples) if state else None
        return RowSamplingState(seq.sampling_params, seq.prompt_token_ids, seq.output_token_ids, seq.seed,
                                bitmask, self.eos_token_ids)

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
