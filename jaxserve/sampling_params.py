"""SamplingParams with vLLM's names and defaults, so offline users can switch."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class GuidedDecodingParams:
    """Exactly one constraint may be set (checked by `validate`)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None

    def constraint_kinds(self) -> list[str]:
        kinds = []
        for name in ("json", "regex", "choice", "grammar", "structural_tag"):
            if getattr(self, name) is not None:
                kinds.append(name)
        if self.json_object:
            kinds.append("json_object")
        return kinds


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context limit
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives besides the sampled token
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # Words never to complete: a word's last token is banned whenever the output so far ends with the tokens
    # before it (vLLM's semantics; a one-token word is banned outright). The engine tokenizes them into
    # bad_words_token_ids (with and without a leading space, see `bad_words_token_ids`).
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    # Keep only the prompt's last k tokens (-1: as many as the context holds).
    truncate_prompt_tokens: int | None = None
    guided_decoding: GuidedDecodingParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.best_of is None:
            self.best_of = self.n

    def validate(self, *, max_logprobs: int = 20, vocab_size: int | None = None) -> None:
        """Raise ValueError(message) naming the offending parameter."""
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if self.n < 1:
            bad(f"n must be at least 1, got {self.n}.")
        if self.best_of is not None and self.best_of < self.n:
            bad(f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0.0:
            bad(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if self.temperature < 0.0:
            bad(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            bad(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                bad(f"{name} must be non-negative, got {value}.")
            if value is not None and value > max_logprobs:
                bad(f"Requested {name} of {value}, which is greater than max allowed: {max_logprobs}")
        check_truncate_prompt_tokens(self.truncate_prompt_tokens)
        if any(not isinstance(word, str) or not word.strip() for word in self.bad_words or ()):
            bad("bad_words must be non-empty strings.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            bad("allowed_token_ids must list at least one token id when given.")
        if vocab_size is not None:
            for name in ("logit_bias", "allowed_token_ids"):
                for tok in getattr(self, name) or ():
                    if not 0 <= tok < vocab_size:
                        bad(f"{name}: token id {tok} out of vocabulary range [0, {vocab_size}).")
            for ids in self.bad_words_token_ids or ():
                if any(not 0 <= tok < vocab_size for tok in ids):
                    bad(f"bad_words: token ids {ids} are outside the vocabulary range [0, {vocab_size}).")
        if self.guided_decoding is not None and len(self.guided_decoding.constraint_kinds()) > 1:
            bad("You can only use one kind of guided decoding but multiple were specified: "
                + ", ".join(self.guided_decoding.constraint_kinds()))

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        """Presence, frequency or repetition penalties: the sampler then needs the tokens so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_token_logprob(self) -> bool:
        """Whether the outputs need each sampled token's logprob: logprobs were asked for, or best_of > n keeps
        the best outputs by their cumulative logprob. Otherwise the sampler skips it (as vLLM, outputs then
        carry no cumulative_logprob)."""
        return self.logprobs is not None or (self.best_of or 1) > self.n


def bad_words_token_ids(words: list[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """Each word's token ids as it would start the text and as it would follow a space (a different token
    sequence in most BPE vocabularies), the second only when it differs in its first token and has as many
    tokens (vLLM's rule: then it is the same word, spelled as a continuation)."""
    out: list[list[int]] = []
    for word in words:
        bare = encode(word.lstrip())
        out.append(bare)
        spaced = encode(" " + word.lstrip())
        if spaced and bare and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return [ids for ids in out if ids]


def check_truncate_prompt_tokens(keep: int | None) -> None:
    if keep is not None and (keep == 0 or keep < -1):
        raise ValueError(f"truncate_prompt_tokens must be -1 (the model's context length) or at least 1, got {keep}.")


def truncate_prompt(prompt_ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """The prompt's last `keep` tokens (-1: the model's context length; None: all of them)."""
    check_truncate_prompt_tokens(keep)
    if keep is None:
        return prompt_ids
    if keep == -1:
        keep = max_model_len
    if keep > max_model_len:
        raise ValueError(f"truncate_prompt_tokens ({keep}) is greater than the model's context length "
                         f"({max_model_len}): ask for fewer tokens.")
    return prompt_ids[-keep:] if len(prompt_ids) > keep else prompt_ids
