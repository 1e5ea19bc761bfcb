"""When a request stops: EOS, stop token ids, stop strings and max_tokens, with vLLM's semantics.

The engine calls `check` once per sampled token, after the detokenizer has appended the token's text:

    delta = detok.add_token(token_id)
    decision = stop_checker.check(token_id, num_output_tokens, detok.text, len(delta))
    if decision: finish with decision.finish_reason / decision.stop_reason, output text = decision.text

A streaming server sends `text[sent:len(text) - stop_checker.holdback(text)]` so that the beginning of a
stop string (which must not appear in the output) is never sent before we know whether it completes.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class StopDecision:
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None  # the matched stop string or stop token id; None for EOS and length
    text: str  # the request's whole output text to keep


class StopChecker:
    """Decides, token by token, whether one sequence is finished.

    Rules (vLLM's): nothing but max_tokens ends a sequence while `num_output_tokens < min_tokens`
    (the sampler also masks EOS and stop tokens then); EOS ends it unless `ignore_eos`, and its text is
    never part of the output; a stop token id ends it with `stop_reason` = the id, its text kept only with
    `include_stop_str_in_output`; a stop string ends it with `stop_reason` = the string and the text cut
    before it (after it with `include_stop_str_in_output`); otherwise reaching `max_tokens` is "length".
    A stop found on the last allowed token is reported as "stop", like OpenAI does.
    """

    def __init__(self, stop: Iterable[str] = (), stop_token_ids: Iterable[int] = (),
                 eos_token_ids: Iterable[int] = (), ignore_eos: bool = False, min_tokens: int = 0,
                 max_tokens: int | None = None, include_stop_str_in_output: bool = False) -> None:
        # An empty stop string would match everywhere; OpenAI and vLLM treat it as absent.
        self.stop = tuple(s for s in stop if s)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.ignore_eos = ignore_eos
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.include_stop_str_in_output = include_stop_str_in_output

    @classmethod
    def from_sampling_params(cls, params: SamplingParams, eos_token_ids: Iterable[int],
                             max_tokens: int) -> StopChecker:
        """`max_tokens` is the effective limit (params.max_tokens, or what the context leaves)."""
        return cls(stop=params.stop or (), stop_token_ids=params.stop_token_ids or (),
                   eos_token_ids=eos_token_ids, ignore_eos=params.ignore_eos,
                   min_tokens=params.min_tokens, max_tokens=max_tokens,
                   include_stop_str_in_output=params.include_stop_str_in_output)

    def check(self, token_id: int, num_output_tokens: int, text: str,
              new_text_len: int) -> StopDecision | None:
        """`num_output_tokens` counts output tokens including `token_id`; `text` is the whole output
        text including the `new_text_len` characters this token added."""
        if num_output_tokens >= self.min_tokens:
            decision = self._check_stops(token_id, text, new_text_len)
            if decision is not None:
                return decision
        if self.max_tokens is not None and num_output_tokens >= self.max_tokens:
            return StopDecision("length", None, text)
        return None

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` could begin a stop string, so must not be streamed yet.

        It is the longest suffix of `text` that is a proper prefix of some stop string. Streaming up to
        `len(text) - holdback(text)` never goes back on what was sent: a longer held suffix later would
        have been a held suffix already.
        """
        if self.include_stop_str_in_output or not self.stop:
            return 0
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _check_stops(self, token_id: int, text: str, new_text_len: int) -> StopDecision | None:
        # the text without this token's characters is sliced only when a stop uses it (a copy per token)
        if token_id in self.eos_token_ids and not self.ignore_eos:
            return StopDecision("stop", None, text[:len(text) - new_text_len])
        if token_id in self.stop_token_ids:
            kept = text if self.include_stop_str_in_output else text[:len(text) - new_text_len]
            return StopDecision("stop", token_id, kept)
        match = self._find_stop_string(text, new_text_len)
        if match is None:
            return None
        start, stop = match
        end = start + len(stop) if self.include_stop_str_in_output else start
        return StopDecision("stop", stop, text[:end])

    def _find_stop_string(self, text: str, new_text_len: int) -> tuple[int, str] | None:
        """The stop string that completes first in `text`, among those ending in the new characters.

        Earlier text was searched on earlier tokens (or was produced before min_tokens), so only
        matches that end inside the last `new_text_len` characters count: each stop string is searched
        from `len(stop) - 1` characters before them.
        Among several matches the one that ends first wins (it would have stopped generation first had
        the text arrived one character at a time); on a tie, the longer one.
        """
        if not new_text_len or not self.stop:
            return None
        old_len = len(text) - new_text_len
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self.stop:
            start = text.find(stop, max(0, old_len - len(stop) + 1))
            if start == -1:
                continue
            candidate = (start + len(stop), -len(stop), stop)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        end, neg_length, stop = best
        return end + neg_length, stop
