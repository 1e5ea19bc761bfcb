"""One generation stream: a request's prompt plus one of its n outputs, as the scheduler sees it."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from jaxserve.sampling_params import SamplingParams


PENDING_TOKEN = -1  # token_slice's stand-in for a token still on the device

# Request-level options a prompt dict may carry beside its text or token ids (as vLLM's request options).
REQUEST_OPTIONS = ("cache_salt", "priority")


def request_options(prompt) -> dict:
    """The request options a prompt dict carries (set ones only); {} for text or token ids."""
    if not isinstance(prompt, dict):
        return {}
    return {key: prompt[key] for key in REQUEST_OPTIONS if prompt.get(key) is not None}


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n outputs
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    seed: int  # per-output random stream (request seed + index, or drawn by the engine)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    pages: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)  # hashes of the prompt's full pages
    num_registered_pages: int = 0  # leading pages already findable in the prefix cache
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at (re)admission
    num_preemptions: int = 0
    # Sampled by the step in flight, not on the host yet (async scheduling): counted in num_tokens, so the
    # scheduler gives the sequence its next position; token_slice shows them as PENDING_TOKEN.
    num_pending_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-stream engine state (detokenizer, ...)
    cache_salt: str | None = None  # prefix-cache pages are shared only between requests with the same salt
    priority: int = 0  # with the "priority" scheduling policy: lower goes first

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """token_ids[start:stop] without concatenating the whole history (decode asks for one token); a
        position whose token is still pending on the device reads PENDING_TOKEN."""
        known = self.num_known_tokens
        if stop > known and self.num_pending_tokens:
            return self.token_slice(start, known) + [PENDING_TOKEN] * (min(stop, self.num_tokens) - max(start, known))
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:stop - num_prompt]
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - num_prompt]

    @property
    def num_tokens(self) -> int:
        """Known tokens plus those pending on the device."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """Still computing tokens it already knows (prompt, or everything after a preemption)."""
        return self.num_computed_tokens < self.num_tokens - 1
