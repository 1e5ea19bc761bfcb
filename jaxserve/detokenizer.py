"""Incremental detokenization: turn one sampled token at a time into a text delta.

Decoding the whole output again after every token costs O(n) per token. Instead we keep two offsets
into the token ids (the scheme of HF's `DecodeStream` and vLLM's `detokenize_incrementally`):

    ids[prefix_offset:read_offset]   tokens already turned into text, kept only as context
    ids[read_offset:]                tokens not yet turned into text (an unfinished UTF-8 character)

A step decodes `ids[prefix_offset:]` and `ids[prefix_offset:read_offset]`; the new text is the
difference. The context matters because decoders are not per-token (SentencePiece strips the leading
space of the first token it sees, byte-level BPE splits one character over several tokens). When the
decoded window ends in U+FFFD the last character may still be incomplete, so nothing is emitted and
the window grows until it completes; `finish()` flushes what never completed.

For tokenizers backed by the Rust `tokenizers` library we let `tokenizers.decoders.DecodeStream` do the
per-step decoding (same algorithm, no Python-level decode calls) and keep the offsets in step with it,
so the final flush and a fallback after a stream error use the same state.
"""
from __future__ import annotations

from typing import Any

try:  # tokenizers >= 0.21
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - the project pins a recent tokenizers
    RustTokenizer = None
    DecodeStream = None

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the output, so the first output token sees its real left context.
# 4 is enough for every decoder we know of; we widen the tail up to 24 tokens when it starts in the
# middle of a multi-byte character (the decoded tail would then hold U+FFFD).
MIN_PROMPT_CONTEXT = 4
MAX_PROMPT_CONTEXT = 24
SENTENCEPIECE_SPACE = "\u2581"


def _rust_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind `tokenizer`, or None for pure-Python tokenizers."""
    if RustTokenizer is None:
        return None
    if isinstance(tokenizer, RustTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, RustTokenizer) else None


class IncrementalDetokenizer:
    """Detokenizes one request's output tokens as they are sampled.

    `text` always equals the decoding of the output ids in the prompt's context (for byte-level BPE
    tokenizers such as SmolLM2's that is exactly `tokenizer.decode(output_ids)`), minus a trailing
    incomplete character that `finish()` releases.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, use_decode_stream: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._backend = _rust_backend(tokenizer)
        context = self._prompt_context(list(prompt_token_ids))
        self._ids: list[int] = context  # prompt context followed by the output ids
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._stream = None
        if use_decode_stream and self._decode_stream_matches_decode():
            self._stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)
        self.text = ""

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def add_token(self, token_id: int) -> str:
        """Append one sampled token; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(token_id)
        delta = self._stream_step(token_id) if self._stream is not None else self._offset_step()
        if delta:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self.text += delta
        return delta

    def finish(self) -> str:
        """Flush tokens that never completed a character (a genuinely invalid byte sequence)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        delta = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._stream = None  # the stream's state is stale now; any later token uses the offsets
        self.text += delta
        return delta

    def decode_token(self, token_id: int) -> str:
        """One token's own text, as vLLM shows it in logprobs (special tokens spelled out)."""
        text = self._decode_raw([token_id], skip_special_tokens=False)
        # SentencePiece decoders drop the leading space of a lone token; put it back from the raw piece.
        piece = self._id_to_piece(token_id)
        if piece and piece.startswith(SENTENCEPIECE_SPACE):
            markers = len(piece) - len(piece.lstrip(SENTENCEPIECE_SPACE))
            missing = markers - (len(text) - len(text.lstrip(" ")))
            if missing > 0:
                text = " " * missing + text
        return text

    # -- internals ---------------------------------------------------------------------------------

    def _stream_step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception:
            # DecodeStream refuses when a decoder output is not an extension of the previous one
            # (vLLM issue 17448) or an id is out of range; the offset method handles both.
            self._stream = None
            return self._offset_step()

    def _offset_step(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        return new_text[len(prefix_text):]

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The shortest prompt tail (at least MIN_PROMPT_CONTEXT tokens) that decodes cleanly.

        If the prompt ends inside a character no tail decodes cleanly; the output is then decoded on
        its own, so its first bytes show as U+FFFD exactly as `tokenizer.decode(output_ids)` shows them.
        """
        if len(prompt_token_ids) <= MIN_PROMPT_CONTEXT:
            candidates = [prompt_token_ids]
        else:
            longest = min(len(prompt_token_ids), MAX_PROMPT_CONTEXT)
            candidates = [prompt_token_ids[-n:] for n in range(MIN_PROMPT_CONTEXT, longest + 1)]
        for tail in candidates:
            if REPLACEMENT_CHAR not in self._decode(tail):
                return list(tail)
        return []

    def _decode_stream_matches_decode(self) -> bool:
        """DecodeStream decodes with the Rust tokenizer alone; a transformers wrapper that post-processes
        decoded text (clean_up_tokenization_spaces on a non-BPE model) would disagree with it."""
        if DecodeStream is None or self._backend is None:
            return False
        if self._backend is self._tokenizer:
            return True
        cleans_up = bool(getattr(self._tokenizer, "clean_up_tokenization_spaces", False))
        return not cleans_up or type(self._backend.model).__name__ == "BPE"

    def _decode(self, ids: list[int]) -> str:
        return self._decode_raw(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool) -> str:
        if not ids:
            return ""
        if self._tokenizer is self._backend:  # a bare tokenizers.Tokenizer
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # Fast (Rust-backed) transformers tokenizers ignore spaces_between_special_tokens; the slow
        # Python ones honour it.
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                      spaces_between_special_tokens=self._spaces_between_special_tokens)

    def _id_to_piece(self, token_id: int) -> str | None:
        if self._tokenizer is self._backend:
            return self._backend.id_to_token(token_id)
        return self._tokenizer.convert_ids_to_tokens(token_id)
