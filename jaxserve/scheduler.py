"""Continuous batching: who runs this step and with how many tokens. Plain Python, no JAX.

Every step: running sequences first (oldest first), each gets its next tokens (1 for decode, a chunk for
a prompt still prefilling) under the token budget; then waiting sequences join while budget and slots
last. When pages run out, the most recently admitted running sequence is preempted: its pages are freed
and it goes back to the front of the queue to be recomputed later (prefix-cache hits make that cheap).

With the "priority" policy (vLLM's --scheduling-policy priority) sequences go by (priority, arrival), lower
first: the queue is kept in that order, running sequences get the step's budget in that order, and the
sequence preempted when pages run out is the last in that order.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from jaxserve.kv_cache_manager import KVCacheManager
from jaxserve.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: str = "fcfs"  # or "priority"


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens
    # A draft row (jaxserve/speculative.py): draft token `draft_token` at draft_index positions past the
    # sequence's last known token, computed (and sampled) as a decode row of its own. 0: a real row.
    draft_index: int = 0
    draft_token: int = -1

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last known token, so its logits are sampled."""
        return self.draft_index > 0 or self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0

    @property
    def _by_priority(self) -> bool:
        return self.config.policy == "priority"

    def add(self, seq: Sequence) -> None:
        if self._by_priority:
            self._queue_by_priority(seq)
        else:
            self.waiting.append(seq)

    def _queue_by_priority(self, seq: Sequence) -> None:
        keys = [_priority_key(s) for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, _priority_key(seq)), seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        kept: list[Sequence] = []
        queue = sorted(self.running, key=_priority_key) if self._by_priority else list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:  # its last token is on its way (async scheduling): nothing to compute
                kept.append(seq)
                continue
            while not self._grow(seq, seq.num_computed_tokens + num_new):
                # the newest running sequence not yet scheduled (by priority: the last in priority order)
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.WAITING:  # preempted itself
                break
            kept.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        kept.extend(queue)  # running sequences that got no budget this step stay running
        self.running = kept

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.pages:
                # Prompt logprobs need every prompt position computed, so those requests skip the cache.
                use_cache = seq.sampling_params.prompt_logprobs is None
                cached, seq.page_hashes = self.kv_cache.lookup_prefix(seq.token_ids, use_cache, seq.cache_salt)
                seq.pages = cached
                seq.num_registered_pages = len(cached)
                seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.kv_cache.page_size
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, seq.num_computed_tokens + num_new):
                # Hand its prefix pages back (they stay cached) so running sequences can use them.
                self._release(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def reserve(self, seq: Sequence, num_tokens: int, keep_free: int = 0) -> bool:
        """Pages for the sequence's first `num_tokens` positions (draft rows write past its known tokens), if
        at least `keep_free` pages stay free after."""
        return self._grow(seq, num_tokens, keep_free)

    def _grow(self, seq: Sequence, num_tokens: int, keep_free: int = 0) -> bool:
        missing = self.kv_cache.pages_needed(num_tokens) - len(seq.pages)
        if missing <= 0:
            return True
        if self.kv_cache.num_free_pages - missing < keep_free:
            return False
        pages = self.kv_cache.allocate(missing)
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    def _release(self, seq: Sequence) -> None:
        self.kv_cache.free(seq.pages)
        seq.pages = []
        seq.num_computed_tokens = 0
        seq.num_registered_pages = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions_total += 1
        if seq in self.running:
            self.running.remove(seq)
        if self._by_priority:
            self._queue_by_priority(seq)
        else:
            self.waiting.appendleft(seq)

    def after_step(self, scheduled: list[ScheduledSeq]) -> None:
        """Advance computed-token counts and publish newly full pages to the prefix cache."""
        ps = self.kv_cache.page_size
        for item in scheduled:
            if item.draft_index:  # counted once the draft is checked (PromptLookup.update)
                continue
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            full = min(seq.num_computed_tokens // ps, len(seq.page_hashes))
            for i in range(seq.num_registered_pages, full):
                self.kv_cache.register_full_page(seq.pages[i], seq.page_hashes[i])
            seq.num_registered_pages = max(seq.num_registered_pages, full)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache.free(seq.pages)
        seq.pages = []

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)


def _priority_key(seq: Sequence) -> tuple:
    return seq.priority, seq.arrival_time, seq.seq_id
