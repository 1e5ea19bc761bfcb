"""Host side of the sampler: the padded per-row numpy arrays and static flags for one engine step.

Plain numpy, vectorized per row (never a Python loop over tokens or the vocabulary). Widths that vary
with the requests (penalty tokens, logit-bias entries, the top-k window) are rounded up to powers of two
so only a few sampler variants ever get compiled. Padded rows are greedy with identity parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jaxserve.sampler import GREEDY_TEMPERATURE, SamplerFlags, SamplingTensors
from jaxserve.sampling_params import SamplingParams

MIN_PENALTY_WINDOW = 64
MIN_LOGIT_BIAS_WIDTH = 8
# The top_k / top_p candidate window: rows whose cut-off falls beyond it take the (slower) exact path.
MIN_FILTER_WINDOW = 64
MAX_FILTER_WINDOW = 1024


@dataclass
class RowSamplingState:
    """What the sampler needs to know about one running sequence at this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int] | np.ndarray
    output_token_ids: Sequence[int] | np.ndarray
    seed: int  # the request's seed, or a random one the engine drew for it
    bitmask: np.ndarray | None = None  # guided decoding: int32[ceil(V/32)], bit set = allowed
    eos_token_ids: Sequence[int] = ()  # forbidden (with stop_token_ids) before min_tokens, unless ignore_eos
    # The packed allowed_token_ids mask. Converting a long id list costs ~2 ms per row per step, so
    # the engine should compute it once per request with `allowed_token_mask`; built here when None.
    allowed_mask: np.ndarray | None = None
    num_pending: int = 0  # outputs sampled by a step in flight (async scheduling), not in output_token_ids yet

    @property
    def num_outputs(self) -> int:
        return len(self.output_token_ids) + self.num_pending


def bucket_width(needed: int, minimum: int) -> int:
    """The smallest power of two >= needed, at least `minimum` (fixed shapes → few compilations)."""
    width = minimum
    while width < needed:
        width *= 2
    return width


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def pack_token_mask(allowed: np.ndarray) -> np.ndarray:
    """bool[V] → int32[ceil(V/32)], bit j of word i = token 32 * i + j."""
    words = bitmask_words(allowed.shape[0])
    padded = np.zeros(words * 32, dtype=bool)
    padded[: allowed.shape[0]] = allowed
    return np.packbits(padded, bitorder="little").view("<i4").astype(np.int32, copy=False)


def unpack_token_mask(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """int32[ceil(V/32)] → bool[V] (the inverse of pack_token_mask)."""
    as_bytes = np.ascontiguousarray(bitmask_row, dtype="<i4").view(np.uint8)
    return np.unpackbits(as_bytes, bitorder="little")[:vocab_size].astype(bool)


def allowed_token_mask(params: SamplingParams, vocab_size: int) -> np.ndarray | None:
    """The packed int32[ceil(V/32)] mask of params.allowed_token_ids (None when unrestricted)."""
    if params.allowed_token_ids is None:
        return None
    allowed = np.zeros(vocab_size, dtype=bool)
    allowed[np.fromiter(params.allowed_token_ids, np.int64, len(params.allowed_token_ids))] = True
    return pack_token_mask(allowed)


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE


def _uses_filtering(params: SamplingParams) -> bool:
    return not _is_greedy(params) and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)


def _forbidden_before_min_tokens(row: RowSamplingState) -> list[int]:
    params = row.params
    if row.num_outputs >= params.min_tokens:
        return []
    forbidden = list(params.stop_token_ids or [])
    if not params.ignore_eos:
        forbidden += list(row.eos_token_ids)
    return forbidden


def _bad_word_bans(row: RowSamplingState) -> list[int]:
    """The last tokens of the bad words whose other tokens end the output so far (one-token words: always)."""
    bans = []
    out = row.output_token_ids
    for ids in row.params.bad_words_token_ids or ():
        before = len(ids) - 1
        if before == 0 or (len(out) >= before and list(out[len(out) - before:]) == ids[:-1]):
            bans.append(ids[-1])
    return bans


def _uses_bitmask(row: RowSamplingState) -> bool:
    return (row.bitmask is not None or row.params.allowed_token_ids is not None
            or bool(row.params.bad_words_token_ids) or bool(_forbidden_before_min_tokens(row)))


def _row_bitmask(row: RowSamplingState, vocab_size: int, out: np.ndarray) -> None:
    """Write the row's combined mask (guided ∧ allowed_token_ids ∧ not-yet-allowed stops ∧ not a bad word's
    end) into `out`."""
    if row.bitmask is not None:
        out &= np.asarray(row.bitmask, dtype=np.int32)
    if row.params.allowed_token_ids is not None:
        allowed = row.allowed_mask
        out &= allowed_token_mask(row.params, vocab_size) if allowed is None else allowed
    forbidden = np.asarray(_forbidden_before_min_tokens(row) + _bad_word_bans(row), dtype=np.int64)
    forbidden = forbidden[(forbidden >= 0) & (forbidden < vocab_size)]
    if forbidden.size:
        as_uint = out.view(np.uint32)
        clear = ~(np.uint32(1) << (forbidden & 31).astype(np.uint32))
        np.bitwise_and.at(as_uint, forbidden >> 5, clear)


def _penalty_arrays(rows: list[RowSamplingState], used: list[bool], size: int) -> tuple[np.ndarray, np.ndarray]:
    """[S, W] prompt+output token ids (-1 padding) and their is-output flags; W = 0 when unused."""
    window = 0
    if any(used):
        needed = max(len(r.prompt_token_ids) + len(r.output_token_ids) for r, u in zip(rows, used) if u)
        window = bucket_width(needed, MIN_PENALTY_WINDOW)
    ids = np.full((size, window), -1, np.int32)
    is_output = np.zeros((size, window), bool)
    for i, row in enumerate(rows):
        if used[i]:
            num_prompt, num_output = len(row.prompt_token_ids), len(row.output_token_ids)
            ids[i, :num_prompt] = row.prompt_token_ids
            ids[i, num_prompt:num_prompt + num_output] = row.output_token_ids
            is_output[i, num_prompt:num_prompt + num_output] = True
    return ids, is_output


def _logit_bias_arrays(rows: list[RowSamplingState], used: list[bool], size: int) -> tuple[np.ndarray, np.ndarray]:
    """[S, B] sparse logit_bias ids (-1 padding) and values; B = 0 when unused."""
    width = 0
    if any(used):
        width = bucket_width(max(len(r.params.logit_bias) for r, u in zip(rows, used) if u), MIN_LOGIT_BIAS_WIDTH)
    ids = np.full((size, width), -1, np.int32)
    values = np.zeros((size, width), np.float32)
    for i, row in enumerate(rows):
        if used[i]:
            bias = row.params.logit_bias
            ids[i, :len(bias)] = np.fromiter(bias.keys(), np.int64, len(bias))
            values[i, :len(bias)] = np.fromiter(bias.values(), np.float64, len(bias))
    return ids, values


def build_sampling_tensors(rows: list[RowSamplingState], bucket_size: int, vocab_size: int,
                           max_logprobs: int) -> tuple[SamplingTensors, SamplerFlags]:
    """Padded numpy SamplingTensors for rows[0..len(rows)) in a bucket of `bucket_size`, and their flags."""
    if len(rows) > bucket_size:
        raise ValueError(f"{len(rows)} rows do not fit in a sampler bucket of {bucket_size}.")
    size = bucket_size
    temperature = np.zeros(size, np.float32)
    top_p = np.ones(size, np.float32)
    top_k = np.zeros(size, np.int32)
    min_p = np.zeros(size, np.float32)
    presence = np.zeros(size, np.float32)
    frequency = np.zeros(size, np.float32)
    repetition = np.ones(size, np.float32)
    seed = np.zeros(size, np.uint32)
    step = np.zeros(size, np.int32)

    greedy = [_is_greedy(r.params) for r in rows]
    filtering = [_uses_filtering(r.params) for r in rows]
    penalties = [r.params.uses_penalties for r in rows]
    biased = [bool(r.params.logit_bias) for r in rows]
    masked = [_uses_bitmask(r) for r in rows]

    for i, row in enumerate(rows):
        params = row.params
        seed[i] = row.seed % (1 << 32)
        step[i] = row.num_outputs
        if not greedy[i]:
            temperature[i] = params.temperature
        if filtering[i]:
            top_p[i] = params.top_p
            top_k[i] = params.top_k if 0 < params.top_k < vocab_size else 0
            min_p[i] = params.min_p
        if penalties[i]:
            presence[i] = params.presence_penalty
            frequency[i] = params.frequency_penalty
            repetition[i] = params.repetition_penalty

    penalty_ids, penalty_is_output = _penalty_arrays(rows, penalties, size)
    bias_ids, bias_values = _logit_bias_arrays(rows, biased, size)
    bitmask = np.full((size, bitmask_words(vocab_size) if any(masked) else 0), -1, np.int32)
    for i, row in enumerate(rows):
        if masked[i]:
            _row_bitmask(row, vocab_size, bitmask[i])

    filter_window = 0
    if any(filtering):
        largest_k = int(top_k.max())
        filter_window = min(bucket_width(largest_k, MIN_FILTER_WINDOW), MAX_FILTER_WINDOW, vocab_size)

    wants_logprobs = any(r.params.logprobs is not None for r in rows)
    flags = SamplerFlags(
        needs_logprob=any(r.params.needs_token_logprob for r in rows),
        all_greedy=all(greedy),
        needs_filtering=any(filtering),
        needs_penalties=any(penalties),
        needs_logit_bias=any(biased),
        needs_bitmask=any(masked),
        num_logprobs=max_logprobs if wants_logprobs and max_logprobs > 0 else 0,
        penalty_window=penalty_ids.shape[1],
        logit_bias_width=bias_ids.shape[1],
        filter_window=filter_window,
    )
    tensors = SamplingTensors(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
        seed=seed, step=step, penalty_token_ids=penalty_ids, penalty_is_output=penalty_is_output,
        logit_bias_ids=bias_ids, logit_bias_values=bias_values, bitmask=bitmask,
        live_rows=np.array([len(rows)], np.int32))
    return tensors, flags


def placeholder_sampling_tensors(flags: SamplerFlags, bucket_size: int,
                                 vocab_size: int) -> SamplingTensors:
    """Identity-parameter tensors of exactly the shapes `flags` implies (for compiling at start-up)."""
    size = bucket_size
    words = bitmask_words(vocab_size) if flags.needs_bitmask else 0
    return SamplingTensors(
        temperature=np.full(size, 0.0 if flags.all_greedy else 1.0, np.float32),
        top_p=np.ones(size, np.float32), top_k=np.zeros(size, np.int32), min_p=np.zeros(size, np.float32),
        presence_penalty=np.zeros(size, np.float32), frequency_penalty=np.zeros(size, np.float32),
        repetition_penalty=np.ones(size, np.float32), seed=np.zeros(size, np.uint32),
        step=np.zeros(size, np.int32),
        penalty_token_ids=np.full((size, flags.penalty_window), -1, np.int32),
        penalty_is_output=np.zeros((size, flags.penalty_window), bool),
        logit_bias_ids=np.full((size, flags.logit_bias_width), -1, np.int32),
        logit_bias_values=np.zeros((size, flags.logit_bias_width), np.float32),
        bitmask=np.full((size, words), -1, np.int32), live_rows=np.array([size], np.int32))
