"""The fixed set of step shapes. Every step is padded to one of these, so all are compiled up front."""
from __future__ import annotations

from dataclasses import dataclass


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    out.append(hi)
    return sorted(set(out))


# From this many tokens a prompt step's padding costs real compute (XLA's dots multiply every padded row), so
# token buckets also take the midpoints 1.5 x 2^k: a 138-token prompt pays for 192 tokens, not 256.
FINE_TOKEN_BUCKETS_FROM = 64


def _token_sizes(lo: int, hi: int) -> list[int]:
    sizes = _powers_of_two(lo, hi)
    halves = [n + n // 2 for n in sizes if n >= FINE_TOKEN_BUCKETS_FROM and n + n // 2 < hi]
    return sorted(set(sizes + halves))


@dataclass(frozen=True)
class StepShape:
    num_tokens: int  # T: flat token batch
    num_seqs: int  # S: sequence slots

    @property
    def decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs


@dataclass(frozen=True)
class BucketSet:
    seq_buckets: tuple[int, ...]
    token_buckets: tuple[int, ...]  # for steps that carry prompt chunks
    # Decode steps wider than max_num_seqs: a sequence's draft rows (jaxserve/speculative.py) each take a row
    draft_buckets: tuple[int, ...] = ()

    @classmethod
    def for_limits(cls, max_num_seqs: int, max_num_batched_tokens: int, max_decode_rows: int = 0) -> "BucketSet":
        """`max_decode_rows`: the most rows of a decode step with drafts, if above max_num_seqs (within the
        token budget)."""
        # No 1-token step shape: XLA turns a one-row cache write or gather into ops that copy the whole
        # KV cache every layer (seconds per step with a large cache); one padded row avoids it.
        # `--max-num-seqs 1` too: padding its decode steps to 2 slots measured ~700x faster on the CPU.
        seqs = _powers_of_two(2, max(2, max_num_seqs))
        # Mixed steps use a coarser sequence grid (x4) to keep the number of compiled shapes small.
        tokens = _token_sizes(min(16, max_num_batched_tokens), max_num_batched_tokens)
        rows = min(max_decode_rows, max_num_batched_tokens)
        drafts = [n for n in _powers_of_two(seqs[-1], rows) if n > seqs[-1]] if rows > seqs[-1] else []
        return cls(tuple(seqs), tuple(tokens), tuple(drafts))

    def mixed_seq_buckets(self) -> tuple[int, ...]:
        coarse = [s for i, s in enumerate(self.seq_buckets) if i % 2 == 0]
        if self.seq_buckets[0] > 1:
            coarse[0] = 1  # a lone prompt chunk (T > 1) is fine with one sequence slot
        if self.seq_buckets[-1] not in coarse:
            coarse.append(self.seq_buckets[-1])
        return tuple(coarse)

    def bucket_for(self, num_tokens: int, num_seqs: int) -> StepShape:
        if num_tokens == num_seqs:
            s = next(b for b in self.seq_buckets + self.draft_buckets if b >= num_seqs)
            return StepShape(s, s)
        s = next(b for b in self.mixed_seq_buckets() if b >= num_seqs)
        t = next(b for b in self.token_buckets if b >= max(num_tokens, s))
        return StepShape(t, s)

    def all_shapes(self) -> list[StepShape]:
        shapes = {StepShape(s, s) for s in self.seq_buckets + self.draft_buckets}
        for t in self.token_buckets:
            for s in self.mixed_seq_buckets():
                if s <= t:
                    shapes.add(StepShape(t, s))
        return sorted(shapes, key=lambda x: (x.num_tokens, x.num_seqs))
