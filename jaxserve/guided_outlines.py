"""The outlines-core backend (`guided_decoding_backend="outlines"`): regex automata over the vocabulary.

outlines-core compiles a regex into a token-level DFA (`Index`), so it supports JSON schemas (via its
schema→regex translation), regexes and choices, but no context-free grammars or structural tags.
Matchers expose the same methods as `jaxserve.guided.GuidedMatcher`.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

import numpy as np

MAX_ROLLBACK = 64
SUPPORTED_KINDS = ("json", "json_object", "regex", "choice")


def outlines_available() -> bool:
    try:
        import outlines_core  # noqa: F401
    except ImportError:
        return False
    return True


class OutlinesVocabulary:
    """The tokenizer's token bytes in outlines-core's form; built once per compiler."""

    def __init__(self, ll_tokenizer: Any, eos_token_ids: Sequence[int]):
        import outlines_core

        if not eos_token_ids:
            raise ValueError("the outlines backend needs an EOS token id")
        self.eos_token_ids = tuple(eos_token_ids)
        by_bytes: dict[bytes, list[int]] = {}
        for token_id in range(ll_tokenizer.vocab_size):
            # Special tokens (other than EOS) can never be produced by a regex over text.
            if token_id in self.eos_token_ids or ll_tokenizer.is_special_token(token_id):
                continue
            token_bytes = ll_tokenizer.decode_bytes([token_id])
            if token_bytes:
                by_bytes.setdefault(token_bytes, []).append(token_id)
        self.max_token_id = max(max(ids) for ids in by_bytes.values())
        self.vocabulary = outlines_core.Vocabulary(self.eos_token_ids[0], by_bytes)
        # outlines-core sizes masks by the largest id it knows (EOS included).
        self.mask_words = (max(self.max_token_id, *self.eos_token_ids) + 1 + 31) // 32


class OutlinesGrammar:
    """A compiled Index plus a per-state memo of "only EOS can follow" (shared by all its matchers)."""

    def __init__(self, index: Any):
        self.index = index
        self.only_eos_states: dict[int, bool] = {}


def regex_for(kind: str, text: str, whitespace_pattern: str | None, no_ws: bool) -> str:
    """The regex outlines-core compiles for a constraint (ValueError for what it cannot express)."""
    from outlines_core.json_schema import build_regex_from_schema

    if kind not in SUPPORTED_KINDS:
        what = "grammar" if kind in ("lark", "gbnf") else kind
        raise ValueError(f"The outlines guided decoding backend does not support {what} constraints; "
                         "use guided_decoding_backend='llguidance'.")
    if kind in ("json", "json_object"):
        ws = whitespace_pattern if whitespace_pattern is not None else ("" if no_ws else None)
        try:
            return build_regex_from_schema(text, ws)
        except ValueError as e:
            raise ValueError(f"Invalid JSON schema: {e}") from None
    if kind == "choice":
        return "(" + "|".join(re.escape(c) for c in json.loads(text)) + ")"
    return text


def compile_outlines(vocab: OutlinesVocabulary, kind: str, text: str, whitespace_pattern: str | None,
                     no_ws: bool) -> OutlinesGrammar:
    import outlines_core

    regex = regex_for(kind, text, whitespace_pattern, no_ws)
    try:
        return OutlinesGrammar(outlines_core.Index(regex, vocab.vocabulary))
    except ValueError as e:
        what = "regex" if kind == "regex" else "JSON schema" if kind.startswith("json") else "choice list"
        raise ValueError(f"Invalid {what}: {e}") from None


class OutlinesMatcher:
    """One request's state in an outlines-core Index, with GuidedMatcher's interface."""

    direct_fill = False  # masks go through a scratch row (outlines' width may differ from the model's)

    def __init__(self, grammar: OutlinesGrammar, vocab: OutlinesVocabulary, vocab_size: int):
        import outlines_core

        self._grammar = grammar
        self._guide = outlines_core.Guide(grammar.index, max_rollback=MAX_ROLLBACK)
        self.vocab_size = vocab_size
        self.eos_token_ids = vocab.eos_token_ids
        self._scratch = np.zeros(vocab.mask_words, dtype=np.int32)
        self._eos_accepted = False
        self._error: str | None = None
        self.num_accepted = 0

    def fill_bitmask(self, row: np.ndarray) -> None:
        from jaxserve.guided import _clear_bits_from

        row[:] = 0
        if self._error is None and not self._eos_accepted:
            self._guide.write_mask_into(self._scratch.ctypes.data, self._scratch.size, 4)
            n = min(row.shape[0], self._scratch.shape[0])
            row[:n] = self._scratch[:n]
            eos_allowed = self._guide.is_finished()
        else:
            eos_allowed = True
        if eos_allowed:  # outlines-core knows one EOS id; the model may have several
            for eos in self.eos_token_ids:
                row.view(np.uint32)[eos // 32] |= np.uint32(1 << (eos % 32))
        _clear_bits_from(row, self.vocab_size)

    def accept_token(self, token_id: int) -> bool:
        if self._error is not None or self._eos_accepted:
            self._error = self._error or f"token {token_id} after the end of the grammar"
            return False
        if token_id in self.eos_token_ids:
            if not self._guide.is_finished():
                self._error = "EOS before the grammar was complete"
                return False
            self._eos_accepted = True
        elif self._guide.accepts_tokens([int(token_id)]):
            self._guide.advance(int(token_id), return_tokens=False)
        else:
            self._error = f"token {token_id} is not allowed by the grammar"
            return False
        self.num_accepted += 1
        return True

    def accept_tokens(self, token_ids: Sequence[int]) -> int:
        for i, tok in enumerate(token_ids):
            if not self.accept_token(tok):
                return i
        return len(token_ids)

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        ids = [int(t) for t in token_ids if t not in self.eos_token_ids]
        n = 0
        while n < len(ids) and self._guide.accepts_tokens(ids[:n + 1]):
            n += 1
        return n

    def is_accepting(self) -> bool:
        return self._eos_accepted or self._guide.is_finished()

    def is_terminated(self) -> bool:
        if self._error is not None or self._eos_accepted:
            return True
        if not self._guide.is_finished():
            return False
        state = self._guide.get_state()
        memo = self._grammar.only_eos_states
        if state not in memo:
            memo[state] = set(self._guide.get_tokens()) <= set(self.eos_token_ids)
        return memo[state]

    @property
    def error(self) -> str | None:
        return self._error

    def rollback(self, num_tokens: int) -> None:
        if num_tokens < 0 or num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens, only {self.num_accepted} accepted")
        steps = num_tokens
        if steps and self._eos_accepted:
            self._eos_accepted = False
            steps -= 1
        if steps:
            self._guide.rollback_state(steps)
        self.num_accepted -= num_tokens

    def reset(self) -> None:
        self._guide.reset()
        self._eos_accepted, self._error, self.num_accepted = False, None, 0
