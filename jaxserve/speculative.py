"""Prompt-lookup speculation for greedy requests: more than one token a step where the text repeats itself.

A small decode step reads every weight once whatever its rows, so a few extra rows cost much less than a
step of their own. Where a greedy sequence's last few tokens occurred earlier in its prompt or output, the
tokens that followed them there are proposed as a draft (prompt lookup: no draft model). Each draft token is
computed as a decode row of its own in the same step, on the sequence's pages, at its position after the
earlier ones (every layer writes a step's K/V before its attention reads them); each row's greedy token is
what sequential decoding would sample there if the draft before it is right. The sequence keeps its real
token's sample, then each draft token that equals the previous row's sample and that row's sample, up to the
first mismatch: at least one token a step, as without drafts.

With the CPU kernels a row's sums do not depend on what else shares its step (batch invariance), so the
tokens are exactly those of decoding one token a step. Only plain greedy rows draft (no logprobs, penalties,
biases, guided decoding or minimum length), only in decode-only steps, and only while the step stays small
(`max_rows`): a large step is compute-bound and an extra row costs what a token costs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import ScheduledSeq, Scheduler
from jaxserve.sequence import Sequence


@dataclass(frozen=True)
class SpeculationConfig:
    num_tokens: int  # most draft tokens per sequence and step; 0 = off
    max_rows: int  # draft rows are added while the step has at most this many rows
    min_ngram: int = 2
    max_ngram: int = 4


def eligible(params: SamplingParams) -> bool:
    """Plain greedy decoding: the draft rows' samples are then exactly the sequential tokens."""
    return (params.greedy and params.n == 1 and (params.best_of or 1) == 1 and params.logprobs is None
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0 and not params.logit_bias and params.allowed_token_ids is None
            and params.guided_decoding is None and params.min_tokens == 0)


def propose(token_ids: list[int], max_tokens: int, min_ngram: int = 2, max_ngram: int = 4) -> list[int]:
    """Up to max_tokens tokens that followed the latest earlier occurrence of the history's last n tokens,
    for the longest n in [min_ngram, max_ngram] that occurs; [] if none does."""
    if max_tokens <= 0:
        return []
    history = np.asarray(token_ids)
    length = len(history)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        # starts s < length - n of an earlier n-gram equal to the last one (each followed by a token)
        match = np.ones(length - n, bool)
        for i in range(n):
            match &= history[i:length - n + i] == history[length - n + i]
        starts = np.flatnonzero(match)
        if starts.size:
            first = int(starts[-1]) + n
            return history[first:first + max_tokens].tolist()
    return []


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
        """The step's rows with draft rows appended, and each drafting sequence's draft by its real row."""
        cfg = self.config
        spare = cfg.max_rows - len(scheduled)
        if cfg.num_tokens <= 0 or spare <= 0 or not all(
                item.num_new_tokens == 1 and item.samples for item in scheduled):
            return scheduled, {}
        rows, drafts = list(scheduled), {}
        for row, item in enumerate(scheduled):
            seq = item.seq
            limit = min(cfg.num_tokens, seq.extra.get("draft_limit", cfg.num_tokens), spare,
                        self._room(seq))
            if limit <= 0 or not eligible(seq.sampling_params):
                continue
            tokens = propose(seq.token_ids, limit, cfg.min_ngram, cfg.max_ngram)
            if not tokens or not scheduler.reserve(seq, seq.num_computed_tokens + 1 + len(tokens)):
                continue
            drafts[row] = Draft(tokens, list(range(len(rows), len(rows) + len(tokens))))
            rows.extend(ScheduledSeq(seq, 1, draft_index=j + 1, draft_token=t) for j, t in enumerate(tokens))
            spare -= len(tokens)
            self.draft_tokens_total += len(tokens)
            if spare <= 0:
                break
        return rows, drafts

    def _room(self, seq: Sequence) -> int:
        """Draft tokens that could still be kept: the last token a request may get is never a draft's input."""
        left = self.max_model_len - seq.num_tokens
        if seq.sampling_params.max_tokens is not None:
            left = min(left, seq.sampling_params.max_tokens - len(seq.output_token_ids))
        return left - 1

    def rows_to_keep(self, row: int, draft: Draft | None, token_ids: np.ndarray) -> list[int]:
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

    def accepted(self, seq: Sequence, draft: Draft, num_accepted: int) -> None:
        """Bookkeeping once a draft's first `num_accepted` tokens were kept: their K/V are the sequence's now,
        and its next draft is at most one token longer than what was kept (a missed draft shrinks it to 1)."""
        seq.num_computed_tokens += num_accepted
        seq.extra["draft_limit"] = num_accepted + 1
        self.accepted_tokens_total += num_accepted
