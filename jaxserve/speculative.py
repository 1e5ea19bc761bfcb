"""Prompt-lookup speculation for greedy requests: more than one token a step where the text repeats itself.

A small decode step reads every weight once whatever its rows, so a few extra rows cost much less than a
step of their own. Where a greedy sequence's last few tokens occurred earlier in its prompt or output, the
tokens that followed them there are proposed as a draft (prompt lookup: no draft model). Each draft token is
computed as a row of its own in the same step, right after the sequence's real row, at its position after the
earlier ones (every layer writes a step's K/V before its attention reads them; the runner makes the rows one
query block, so the sequence's pages are read once); each row's greedy token is
what sequential decoding would sample there if the draft before it is right. The sequence keeps its real
token's sample, then each draft token that equals the previous row's sample and that row's sample, up to the
first mismatch: at least one token a step, as without drafts.

With the CPU kernels a row's sums do not depend on what else shares its step (batch invariance), so the
tokens are exactly those of decoding one token a step. Only plain greedy rows draft (no logprobs, penalties,
biases, guided decoding or minimum length); a step that also carries prompt chunks drafts within its token
budget. Up to `cheap_rows` rows a step (memory-bound: an extra row costs a fraction of a token) every
drafting sequence of a short context gets a share; past them, or past `cheap_context` tokens (a draft row's
attention still spans the whole context), a row costs about what a token costs, so only sequences whose
drafts have mostly been right (`min_hit_rate`) get rows, up to `max_rows`. A proposal that gets no rows is still scored
against the token the step gives, so a sequence's record needs no rows to build.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import ScheduledSeq, Scheduler
from jaxserve.sequence import Sequence


@dataclass(frozen=True)
class SpeculationConfig:
    num_tokens: int  # most draft tokens per sequence and step; 0 = off
    max_rows: int  # most rows (real and draft) of a step with drafts
    cheap_rows: int = 8  # rows any drafting sequence may fill; past them only reliable drafters draft
    # ... unless its context is longer: a draft row's attention spans the whole context (its sequence's pages
    # are read once for all its rows, but each row computes over them)
    cheap_context: int = 1024
    min_hit_rate: float = 0.8  # a reliable drafter's recent share of draft tokens kept
    start_hit_rate: float = 0.5  # a new sequence's, before any of its proposals was scored
    min_ngram: int = 2
    max_ngram: int = 4


def eligible(params: SamplingParams) -> bool:
    """Plain greedy decoding: the draft rows' samples are then exactly the sequential tokens."""
    return (params.greedy and params.n == 1 and (params.best_of or 1) == 1 and params.logprobs is None
            and not params.uses_penalties and not params.logit_bias and params.allowed_token_ids is None
            and not params.bad_words
            and params.guided_decoding is None and params.min_tokens == 0)


class NgramIndex:
    """Where each n-gram (min_ngram <= n <= max_ngram) of a sequence's history last ended, built as the
    history grows: a lookup per step instead of a scan of the whole history."""

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4):
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.last_end: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in last_end

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens tokens that followed the latest earlier occurrence of the history's last n tokens,
        for the longest n that occurs; [] if none does. A copy that reaches the end of the history goes on
        from its own start (a loop of period p repeats every p tokens)."""
        length = len(token_ids)
        for end in range(self.indexed, length - 1):  # every n-gram but the last one's own
            for n in self.sizes:
                if end + 1 >= n:
                    self.last_end[tuple(token_ids[end + 1 - n:end + 1])] = end
        self.indexed = max(self.indexed, length - 1)
        if max_tokens <= 0:
            return []
        for n in self.sizes:
            end = self.last_end.get(tuple(token_ids[length - n:])) if length > n else None
            if end is not None:
                first = end + 1
                draft = token_ids[first:first + max_tokens]
                while len(draft) < max_tokens:
                    draft.append(draft[len(draft) - (length - first)])
                return draft
        return []


def propose(token_ids: list[int], max_tokens: int, min_ngram: int = 2, max_ngram: int = 4) -> list[int]:
    """NgramIndex.propose on a fresh index."""
    return NgramIndex(min_ngram, max_ngram).propose(list(token_ids), max_tokens)


@dataclass
class Draft:
    tokens: list[int]
    rows: list[int]  # the step rows that compute them, in order


class PromptLookup:
    def __init__(self, config: SpeculationConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.draft_tokens_total = 0
        self.accepted_tokens_total = 0

    def add_drafts(self, scheduled: list[ScheduledSeq], scheduler: Scheduler
                   ) -> tuple[list[ScheduledSeq], dict[int, Draft]]:
        """The step's rows with each drafting sequence's draft rows right after its real row, and its draft by
        that row's index."""
        cfg = self.config
        decoding = [item.num_new_tokens == 1 and item.samples for item in scheduled]
        # rows within max_rows (a step with longer prompt chunks: within max_num_seqs, its buckets' widest),
        # tokens within the step's budget (a step with prompt chunks may have filled it)
        one_token_rows = all(item.num_new_tokens == 1 for item in scheduled)
        max_rows = cfg.max_rows if one_token_rows else min(cfg.max_rows, scheduler.config.max_num_seqs)
        budget = min(max_rows - len(scheduled),
                     scheduler.config.max_num_batched_tokens - sum(item.num_new_tokens for item in scheduled))
        if cfg.num_tokens <= 0 or budget <= 0 or not any(decoding):
            return scheduled, {}
        proposals = []  # (row, draft tokens) of the decoding sequences that have one
        for row, item in enumerate(scheduled):
            seq = item.seq
            if not decoding[row]:
                continue
            limit = min(cfg.num_tokens, seq.extra.get("draft_limit", cfg.num_tokens), self._room(seq))
            if limit > 0 and eligible(seq.sampling_params):
                index = seq.extra.get("ngram_index")
                if index is None:
                    index = seq.extra["ngram_index"] = NgramIndex(cfg.min_ngram, cfg.max_ngram)
                tokens = index.propose(seq.token_ids, limit)
                if tokens:
                    proposals.append((row, tokens))
        # Spare rows are dealt one at a time round the drafting sequences, so that each gets a share: the
        # cheap ones to all, the rest up to max_rows to the reliable ones.
        share = [0] * len(proposals)
        cheap = min(budget, max(0, cfg.cheap_rows - len(scheduled)))
        reliable = [scheduled[row].seq.extra.get("draft_hit_rate", cfg.start_hit_rate) >= cfg.min_hit_rate
                    for row, _ in proposals]
        short = [scheduled[row].seq.num_tokens <= cfg.cheap_context for row, _ in proposals]
        for spare, allowed in ((cheap, [s or r for s, r in zip(short, reliable)]),
                               (budget - cheap, reliable)):
            takers = [i for i in range(len(proposals)) if allowed[i]]
            while spare > 0 and any(share[i] < len(proposals[i][1]) for i in takers):
                for i in takers:
                    if spare > 0 and share[i] < len(proposals[i][1]):
                        share[i] += 1
                        spare -= 1
        # A sequence's draft rows follow its real row, so that the step's attention reads the sequence's
        # pages once for all of them (ModelRunner.prepare makes consecutive positions one query block).
        granted = {row: (tokens, n) for (row, tokens), n in zip(proposals, share)}
        rows, drafts = [], {}
        for row, item in enumerate(scheduled):
            rows.append(item)
            if row not in granted:
                continue
            tokens, n = granted[row]
            seq = item.seq
            seq.extra["unchecked_draft"] = tokens[0]  # scored against the step's token if it gets no rows
            tokens = tokens[:n]
            # a page per running sequence stays free: drafts never cost a real token a preemption
            if not tokens or not scheduler.reserve(seq, seq.num_computed_tokens + 1 + len(tokens),
                                                   keep_free=scheduler.num_running):
                continue
            drafts[len(rows) - 1] = Draft(tokens, list(range(len(rows), len(rows) + len(tokens))))
            rows.extend(ScheduledSeq(seq, 1, draft_index=j + 1, draft_token=t) for j, t in enumerate(tokens))
            self.draft_tokens_total += len(tokens)
        return rows, drafts

    def _room(self, seq: Sequence) -> int:
        """Draft tokens that could still be kept: the last token a request may get is never a draft's input."""
        left = self.max_model_len - seq.num_tokens
        if seq.sampling_params.max_tokens is not None:
            left = min(left, seq.sampling_params.max_tokens - len(seq.output_token_ids))
        return left - 1

    def rows_to_keep(self, row: int, draft: Draft | None, token_ids: list[int]) -> list[int]:
        """The rows whose samples the sequence keeps: its real row, then each draft row whose input token
        is the previous kept row's sample."""
        kept = [row]
        if draft is None:
            return kept
        for token, draft_row in zip(draft.tokens, draft.rows):
            if token != int(token_ids[kept[-1]]):
                break
            kept.append(draft_row)
        return kept

    def update(self, seq: Sequence, draft: Draft | None, kept: list[int]) -> None:
        """Bookkeeping once the sequence kept the tokens `kept` this step. A draft's accepted tokens' K/V are
        the sequence's now; its next draft is at most one token longer than what was kept (a missed draft
        shrinks it to 1). Its hit rate moves toward the share of the draft kept, or, for a proposal that got
        no rows, toward whether its first token was right (so a sequence left out is still scored)."""
        unchecked = seq.extra.pop("unchecked_draft", None)
        if draft is not None:
            num_accepted = len(kept) - 1
            seq.num_computed_tokens += num_accepted
            seq.extra["draft_limit"] = num_accepted + 1
            hit = num_accepted / len(draft.tokens)
            self.accepted_tokens_total += num_accepted
        elif unchecked is not None:
            hit = float(unchecked == kept[0])
        else:
            return
        seq.extra["draft_hit_rate"] = 0.7 * seq.extra.get("draft_hit_rate", self.config.start_hit_rate) + 0.3 * hit
