"""Guided decoding: compile constraints to grammars once, track one matcher per request, build bitmasks.

The engine's per-step contract (see docs/design.md "Guided decoding"):
  1. While the device runs step t, the host calls `matcher.fill_bitmask(bitmask[row])` for every guided
     row (or `compiler.fill_bitmasks(...)` for all of them at once); unguided rows keep all bits set
     (`allocate_bitmask` starts every row at -1 = everything allowed).
  2. The sampler applies the `[S, ceil(V/32)]` int32 bitmask on device with `apply_bitmask_jax` (or
     `bitmask_to_allowed` for a boolean mask) before top-k/top-p, so disallowed tokens get -inf.
  3. After sampling, `matcher.accept_token(tok)`; a False return means the token broke the grammar
     (only possible when the mask was not applied) and the request should finish with an error.
  4. When `matcher.is_terminated()` the grammar is complete and nothing but EOS may follow: the engine
     finishes the request (finish_reason "stop") without spending another step on the EOS.

Bit layout (the same as llguidance / xgrammar): token t is allowed iff bit (t % 32) of word t // 32 is 1.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxserve.sampling_params import GuidedDecodingParams

LLGUIDANCE_BACKEND_NAMES = ("llguidance", "guidance", "auto")
# JSON whitespace between tokens when the request names no pattern: compact (nothing or one space) or pretty
# printed (a newline and an indent of up to 32 blanks). vLLM allows any run of blanks; small models given that
# freedom pad every gap with runs of spaces or blank lines and spend their max_tokens before the object closes.
DEFAULT_JSON_WHITESPACE = r"(\x20|\x0A[\x20\x09]{0,32})?"
# A GBNF rule line looks like `name ::= ...`; Lark uses `name:`.
_GBNF_RULE = re.compile(r"^\s*[A-Za-z_][\w-]*\s*::=", re.MULTILINE)


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int) -> np.ndarray:
    """An all-allowed `[num_rows, ceil(vocab/32)]` int32 bitmask (unguided rows stay like this)."""
    return np.full((num_rows, bitmask_width(vocab_size)), -1, dtype=np.int32)


def bitmask_to_allowed_numpy(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool[..., vocab_size]: True where the token's bit is set."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask, dtype=np.int32).view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :vocab_size].astype(bool)


def apply_bitmask_numpy(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """Return a copy of logits `[..., V]` with disallowed tokens set to -inf."""
    allowed = bitmask_to_allowed_numpy(bitmask, logits.shape[-1])
    return np.where(allowed, logits, -np.inf).astype(logits.dtype)


def bitmask_to_allowed(bitmask: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """On device: int32 `[S, W]` bitmask → bool `[S, vocab_size]` (jit-friendly, static vocab_size)."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    # Arithmetic shift of negative words is fine: we only look at the lowest bit afterwards.
    bits = (jnp.right_shift(bitmask[..., :, None], shifts) & 1).astype(jnp.bool_)
    return bits.reshape(*bitmask.shape[:-1], bitmask.shape[-1] * 32)[..., :vocab_size]


def apply_bitmask_jax(logits: jnp.ndarray, bitmask: jnp.ndarray) -> jnp.ndarray:
    """On device: logits `[S, V]` with disallowed tokens at -inf (rows of -1 words are untouched)."""
    allowed = bitmask_to_allowed(bitmask, logits.shape[-1])
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, dtype=logits.dtype))


@dataclass(frozen=True)
class _BackendSpec:
    """`guided_decoding_backend` as vLLM spells it: `name[:option,option]`."""

    name: str
    disable_any_whitespace: bool

    @classmethod
    def parse(cls, text: str, default: "_BackendSpec") -> "_BackendSpec":
        if not text:
            return default
        name, _, opts = text.partition(":")
        options = {o.strip() for o in opts.split(",") if o.strip()}
        unknown = options - {"disable-any-whitespace", "no-fallback", "disable-additional-properties"}
        if unknown:
            raise ValueError(f"Unknown guided decoding backend option(s): {', '.join(sorted(unknown))}")
        return cls(name.strip().lower() or default.name,
                   default.disable_any_whitespace or "disable-any-whitespace" in options)


class GuidedMatcher:
    """One request's position in its grammar. Not thread-safe: owned by the engine thread."""

    def __init__(self, ll_matcher: Any, vocab_size: int, ll_vocab_size: int, eos_token_ids: Sequence[int]):
        self._m = ll_matcher
        self.vocab_size = vocab_size
        self._ll_vocab_size = ll_vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        # llguidance writes masks of its own width; when that differs from the model's we go via scratch.
        self._scratch = (None if bitmask_width(ll_vocab_size) == bitmask_width(vocab_size)
                         else np.zeros(bitmask_width(ll_vocab_size), dtype=np.int32))
        self.num_accepted = 0

    @property
    def ll_matcher(self) -> Any:
        return self._m

    @property
    def direct_fill(self) -> bool:
        return self._scratch is None

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the allowed-next-token bits into `row` (int32[ceil(vocab_size/32)], C-contiguous)."""
        if row.dtype != np.int32 or row.ndim != 1 or row.shape[0] != bitmask_width(self.vocab_size):
            raise ValueError(f"bitmask row must be int32[{bitmask_width(self.vocab_size)}], "
                             f"got {row.dtype}{list(row.shape)}")
        if not row.flags["C_CONTIGUOUS"]:
            raise ValueError("bitmask row must be C-contiguous")
        if self._scratch is None:
            self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        else:
            self._m.unsafe_compute_mask_ptr(self._scratch.ctypes.data, self._scratch.nbytes)
            n = min(row.shape[0], self._scratch.shape[0])
            row[:] = 0
            row[:n] = self._scratch[:n]
        _clear_bits_from(row, min(self.vocab_size, self._ll_vocab_size))

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it (the matcher is then in error)."""
        if not 0 <= token_id < self._ll_vocab_size:
            return False
        ok = bool(self._m.consume_token(int(token_id)))
        if ok:
            self.num_accepted += 1
        return ok

    def accept_tokens(self, token_ids: Sequence[int]) -> int:
        """Accept tokens in order until one is rejected; returns how many were accepted."""
        for i, tok in enumerate(token_ids):
            if not self.accept_token(tok):
                return i
        return len(token_ids)

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens would be accepted (state unchanged); for speculative decoding."""
        return int(self._m.validate_tokens([int(t) for t in token_ids]))

    def is_terminated(self) -> bool:
        """True when the grammar is complete (only EOS may follow) or the matcher is in error."""
        return bool(self._m.is_stopped())

    def is_accepting(self) -> bool:
        """True when stopping here would leave a complete answer (EOS is allowed now)."""
        return bool(self._m.is_accepting())

    @property
    def error(self) -> str | None:
        return (self._m.get_error() or "grammar error") if self._m.is_error() else None

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, stop strings)."""
        if num_tokens < 0 or num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens, only {self.num_accepted} accepted")
        if num_tokens and not self._m.rollback(num_tokens):
            raise RuntimeError(f"guided matcher rollback failed: {self._m.get_error()}")
        self.num_accepted -= num_tokens

    def reset(self) -> None:
        self._m.reset()
        self.num_accepted = 0


def _clear_bits_from(row: np.ndarray, first_disallowed: int) -> None:
    """Disallow every token id >= first_disallowed (model vocab padding beyond the tokenizer)."""
    total = row.shape[0] * 32
    if first_disallowed >= total:
        return
    word, bit = divmod(first_disallowed, 32)
    if bit:
        row[word] &= np.int32((1 << bit) - 1)  # bit < 32, so this fits in int32
        word += 1
    row[word:] = 0


class GuidedDecodingCompiler:
    """Turns GuidedDecodingParams into matchers; compiled grammars live in a bounded LRU cache.

    The tokenizer-side index (~1 s) is built on first use, so engines that never see a guided
    request pay nothing. Thread-safe: the server may call `matcher_for` to validate a request early.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, backend: str = "llguidance", cache_size: int = 64,
                 *, eos_token_ids: Sequence[int] | None = None, disable_any_whitespace: bool = False):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.cache_size = int(cache_size)
        eos = list(eos_token_ids or [])
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = [int(tokenizer.eos_token_id)]
        self.eos_token_ids = tuple(eos)
        self._default_backend = _BackendSpec.parse(backend, _BackendSpec("llguidance", disable_any_whitespace))
        self._check_backend(self._default_backend.name)
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._outlines_vocab: Any = None
        self._executor: Any = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # ---------------------------------------------------------------- public API
    def matcher_for(self, params: GuidedDecodingParams) -> GuidedMatcher:
        """A fresh matcher for one request; raises ValueError naming a bad schema/regex/grammar."""
        spec = _BackendSpec.parse(params.backend or "", self._default_backend)
        self._check_backend(spec.name)
        kind, key_text = _constraint_key(params)
        outlines = spec.name == "outlines"
        key = (outlines, kind, key_text, params.whitespace_pattern, spec.disable_any_whitespace)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
            else:
                self.cache_misses += 1
                compile_fn = self._compile_outlines if outlines else self._compile
                template = compile_fn(kind, key_text, params.whitespace_pattern, spec.disable_any_whitespace)
                self._cache[key] = template
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            ll_vocab = self._ll_tokenizer.vocab_size
        if outlines:
            from jaxserve.guided_outlines import OutlinesMatcher

            return OutlinesMatcher(template, self._outlines_vocab, self.vocab_size)
        # deep_copy shares the compiled lexer/parser tables; only the parse state is per request.
        return GuidedMatcher(template.deep_copy(), self.vocab_size, ll_vocab, self.eos_token_ids)

    def validate(self, params: GuidedDecodingParams) -> None:
        """Raise ValueError if the constraint does not compile (fills the cache as a side effect)."""
        self.matcher_for(params)

    def fill_bitmasks(self, rows: Sequence[tuple[Any, int]], bitmask: np.ndarray) -> None:
        """Fill `bitmask[row]` for every (matcher, row) pair, in parallel threads where possible."""
        if not rows:
            return
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or not bitmask.flags["C_CONTIGUOUS"] \
                or bitmask.shape[1] != bitmask_width(self.vocab_size):
            raise ValueError(f"bitmask must be a C-contiguous int32 [S, {bitmask_width(self.vocab_size)}] array")
        direct = [(m.ll_matcher, i) for m, i in rows if m.direct_fill]
        if len(direct) > 1:
            import llguidance.numpy as llnp

            llnp.fill_next_token_bitmask_par(self._get_executor(), direct, bitmask)
            for m, i in rows:
                if m.direct_fill:
                    _clear_bits_from(bitmask[i], min(self.vocab_size, self._ll_tokenizer.vocab_size))
        for m, i in rows:
            if not m.direct_fill or len(direct) <= 1:
                m.fill_bitmask(bitmask[i])

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.cache_hits, "misses": self.cache_misses, "size": len(self._cache),
                    "max_size": self.cache_size}

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _check_backend(name: str) -> None:
        if name in LLGUIDANCE_BACKEND_NAMES:
            return
        if name == "outlines":
            from jaxserve.guided_outlines import outlines_available

            if outlines_available():
                return
            raise ValueError("guided_decoding_backend 'outlines' needs the outlines-core package, which is "
                             "not installed; use 'llguidance'.")
        if name in ("xgrammar", "lm-format-enforcer"):
            raise ValueError(f"guided_decoding_backend '{name}' is not available in this server; "
                             f"use 'llguidance' or 'outlines'.")
        raise ValueError(f"Unknown guided_decoding_backend '{name}'; supported: llguidance, outlines.")

    def _get_ll_tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance.hf

            n_vocab = max(self.vocab_size, len(self.tokenizer))
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=n_vocab, eos_token=list(self.eos_token_ids) or None)
        return self._ll_tokenizer

    def _get_executor(self) -> Any:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def _compile_outlines(self, kind: str, text: str, whitespace_pattern: str | None, no_ws: bool) -> Any:
        from jaxserve.guided_outlines import OutlinesVocabulary, compile_outlines

        if self._outlines_vocab is None:
            self._outlines_vocab = OutlinesVocabulary(self._get_ll_tokenizer(), self.eos_token_ids)
        return compile_outlines(self._outlines_vocab, kind, text, whitespace_pattern, no_ws)

    def _compile(self, kind: str, text: str, whitespace_pattern: str | None, no_ws: bool) -> Any:
        import llguidance

        grammar = _grammar_text(kind, text, whitespace_pattern, no_ws)
        matcher = llguidance.LLMatcher(self._get_ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"Invalid {_KIND_NAMES[kind]}: {matcher.get_error().strip()}")
        return matcher


_KIND_NAMES = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
               "choice": "choice list", "lark": "Lark grammar", "gbnf": "GBNF grammar",
               "structural_tag": "structural tag"}


def _constraint_key(params: GuidedDecodingParams) -> tuple[str, str]:
    """(kind, canonical text) of the single constraint; the cache key and the compiler's input."""
    kinds = params.constraint_kinds()
    if len(kinds) != 1:
        raise ValueError("Exactly one guided decoding constraint must be set, got "
                         + (", ".join(kinds) if kinds else "none"))
    kind = kinds[0]
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"Invalid JSON schema: not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"Invalid JSON schema: expected an object, got {type(schema).__name__}")
        # Not sort_keys: llguidance emits properties in schema order, so order is part of the constraint.
        return "json", json.dumps(schema, separators=(",", ":"))
    if kind == "json_object":
        return "json_object", '{"type": "object"}'
    if kind == "choice":
        choices = params.choice
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("Invalid choice list: guided_choice must be a non-empty list of strings")
        return "choice", json.dumps(list(choices))
    if kind == "regex":
        if not isinstance(params.regex, str):
            raise ValueError("Invalid regex: guided_regex must be a string")
        return "regex", params.regex
    if kind == "grammar":
        if not isinstance(params.grammar, str) or not params.grammar.strip():
            raise ValueError("Invalid grammar: guided_grammar must be a non-empty string")
        return ("gbnf" if _GBNF_RULE.search(params.grammar) else "lark"), params.grammar
    return "structural_tag", params.structural_tag if isinstance(params.structural_tag, str) \
        else json.dumps(params.structural_tag)


def _grammar_text(kind: str, text: str, whitespace_pattern: str | None, no_ws: bool) -> str:
    """llguidance grammar source for a constraint; ValueError for input it cannot even convert."""
    from llguidance import LLMatcher

    if kind in ("json", "json_object"):
        options: dict[str, Any] = {}
        if whitespace_pattern is not None:
            options["whitespace_pattern"] = whitespace_pattern
        elif no_ws:
            options["whitespace_flexible"] = False
        else:
            options["whitespace_pattern"] = DEFAULT_JSON_WHITESPACE
        try:
            return LLMatcher.grammar_from_json_schema(text, overrides=options)
        except ValueError as e:
            raise ValueError(f"Invalid JSON schema: {e}") from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(text)))
    if kind == "lark":
        return LLMatcher.grammar_from_lark(text)
    if kind == "gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            return LLMatcher.grammar_from_lark(gbnf_to_lark(text))
        except Exception as e:  # the converter raises several exception types
            raise ValueError(f"Invalid GBNF grammar: {e}") from None
    return _structural_tag_grammar(text)


def _structural_tag_grammar(text: str) -> str:
    """vLLM's structural_tag (`{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`)."""
    from llguidance import StructTag

    try:
        spec = json.loads(text)
        triggers = list(spec["triggers"])
        tags = []
        for s in spec["structures"]:
            trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
            if trigger is None:
                raise ValueError(f"begin {s['begin']!r} starts with none of the triggers {triggers}")
            tags.append(StructTag(trigger=trigger, begin=s["begin"], grammar=s.get("schema", {}), end=s["end"]))
        if not tags:
            raise ValueError("no structures")
        return StructTag.to_grammar(tags)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"Invalid structural tag: {e}") from None
