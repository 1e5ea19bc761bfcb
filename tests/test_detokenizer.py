"""IncrementalDetokenizer against full decoding, on SmolLM2's real tokenizer and two small trained ones."""
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxserve.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  \n\ttabs\n\nand blank lines",
    "日本語のテキストと中文文本, 한국어 텍스트",
    "Emoji: 🎉🚀 family 👨‍👩‍👧 flag 🇯🇵 skin 👋🏽 done",
    "Accents: café naïve Ærøskøbing, math ∑∫√∞ ≠ ≤, arrows → ⇒",
    "Hi<|im_end|> there<|im_start|>assistant\nSure!<|endoftext|>",
    "def f(x):\n    return {'a': [1, 2]}  # ¿qué? «ok» — “quotes”",
]
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hello world, hello there",
    "streaming tokens one at a time", "def main():\n    print('hi')\n",
] * 20


@pytest.fixture(scope="session")
def smollm2():
    """The default model's tokenizer, built from the embedded GGUF as the server builds it (slow: ~8 s)."""
    from jaxserve.models.weights import load_tokenizer, resolve_model_source
    return load_tokenizer(resolve_model_source(None))


def _trained_byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="session")
def byte_level_bpe() -> Tokenizer:
    """A tiny GPT-2-style byte-level BPE with special and non-special added tokens."""
    tok = _trained_byte_level_bpe()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.add_tokens(["<tool>"])
    return tok


@pytest.fixture(scope="session")
def sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: Metaspace '▁' spaces, byte fallback for unknown characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def decode(tokenizer, ids, skip_special_tokens=True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def vocab_size(tokenizer) -> int:
    return tokenizer.get_vocab_size() if isinstance(tokenizer, Tokenizer) else len(tokenizer)


def encode(tokenizer, text) -> list[int]:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def stream_and_check(tokenizer, prompt, output, expected, *, use_decode_stream, skip_special_tokens=True):
    """Detokenize `output` token by token; check every intermediate state; return the deltas."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens,
                                   use_decode_stream=use_decode_stream)
    deltas = []
    for token_id in output:
        deltas.append(detok.add_token(token_id))
        assert detok.text == "".join(deltas)
        assert expected.startswith(detok.text), (detok.text, expected)
        assert not detok.text.endswith(REPLACEMENT) or expected.count(REPLACEMENT) > 0
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas) == expected
    if REPLACEMENT not in expected:  # an incomplete character was never shown as U+FFFD
        assert not any(REPLACEMENT in d for d in deltas)
    assert detok.output_token_ids == list(output)
    return deltas


PATHS = pytest.mark.parametrize("use_decode_stream", [True, False], ids=["decode_stream", "offsets"])
SKIP = pytest.mark.parametrize("skip_special_tokens", [True, False], ids=["skip_special", "keep_special"])


@PATHS
@SKIP
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_real_texts_match_full_decode_at_every_prompt_split(smollm2, text, use_decode_stream,
                                                             skip_special_tokens):
    ids = encode(smollm2, text)
    for cut in range(len(ids)):
        prompt, output = ids[:cut], ids[cut:]
        stream_and_check(smollm2, prompt, output, decode(smollm2, output, skip_special_tokens),
                         use_decode_stream=use_decode_stream, skip_special_tokens=skip_special_tokens)


@PATHS
@SKIP
def test_random_token_sequences_match_full_decode(smollm2, use_decode_stream, skip_special_tokens):
    rng = random.Random(0)
    specials = smollm2.all_special_ids + list(range(17))
    for _ in range(150):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(vocab_size(smollm2))
               for _ in range(rng.randrange(1, 40))]
        cut = rng.randrange(len(ids))
        stream_and_check(smollm2, ids[:cut], ids[cut:], decode(smollm2, ids[cut:], skip_special_tokens),
                         use_decode_stream=use_decode_stream, skip_special_tokens=skip_special_tokens)


@PATHS
def test_emoji_split_over_tokens_appears_whole_once_complete(smollm2, use_decode_stream):
    output = encode(smollm2, " 🎉")
    assert len(output) == 3  # ' ' + 4 UTF-8 bytes spread over three byte-level tokens
    deltas = stream_and_check(smollm2, encode(smollm2, "Party"), output, " 🎉",
                              use_decode_stream=use_decode_stream)
    assert deltas == ["", "", " 🎉", ""]


@PATHS
def test_special_tokens_mid_output(smollm2, use_decode_stream):
    output = encode(smollm2, "Hi<|im_end|> there")
    kept = stream_and_check(smollm2, [1], output, "Hi<|im_end|> there", use_decode_stream=use_decode_stream,
                            skip_special_tokens=False)
    assert "<|im_end|>" in kept
    skipped = stream_and_check(smollm2, [1], output, "Hi there", use_decode_stream=use_decode_stream)
    assert skipped.count("") >= 2  # the skipped token added nothing, nor did finish()


@PATHS
def test_leading_space_token_right_after_prompt(smollm2, use_decode_stream):
    prompt, output = encode(smollm2, "Hello"), encode(smollm2, " world")
    assert stream_and_check(smollm2, prompt, output, " world", use_decode_stream=use_decode_stream) == [
        " world", ""]


@PATHS
def test_invalid_byte_sequence_is_flushed_by_finish(smollm2, use_decode_stream):
    lone_byte = smollm2.convert_tokens_to_ids("ĸ")  # a UTF-8 continuation byte on its own
    deltas = stream_and_check(smollm2, encode(smollm2, "x"), [lone_byte], REPLACEMENT,
                              use_decode_stream=use_decode_stream)
    assert deltas == ["", REPLACEMENT]
    # Valid text after the broken byte releases it at once, as full decoding shows it.
    deltas = stream_and_check(smollm2, encode(smollm2, "x"), [lone_byte] + encode(smollm2, " ok"),
                              REPLACEMENT + " ok", use_decode_stream=use_decode_stream)
    assert deltas == ["", REPLACEMENT + " ok", ""]


@PATHS
def test_prompt_ending_inside_a_character(smollm2, use_decode_stream):
    ids = encode(smollm2, "a🎉 b")
    for cut in range(2, len(ids)):
        stream_and_check(smollm2, ids[:cut], ids[cut:], decode(smollm2, ids[cut:]),
                         use_decode_stream=use_decode_stream)


def test_decode_token_for_logprobs(smollm2):
    detok = IncrementalDetokenizer(smollm2, [])
    assert detok.decode_token(encode(smollm2, " ok")[0]) == " ok"
    assert detok.decode_token(smollm2.eos_token_id) == "<|im_end|>"  # shown even though skipped in text
    assert detok.decode_token(smollm2.convert_tokens_to_ids("ĸ")) == REPLACEMENT


def test_offset_window_stays_small():
    """The offset method decodes a few tokens per step, not the whole output (O(1) per token)."""
    class CountingTokenizer:
        def __init__(self, inner):
            self.inner, self.longest_decode = inner, 0

        def decode(self, ids, **kwargs):
            self.longest_decode = max(self.longest_decode, len(ids))
            return self.inner.decode(ids, skip_special_tokens=kwargs["skip_special_tokens"])

    tokenizer = CountingTokenizer(_trained_byte_level_bpe())
    output = encode(tokenizer.inner, "hello world 日本語 🎉 " * 50)
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer.inner, "streaming"))
    for token_id in output:
        detok.add_token(token_id)
    assert detok.text == tokenizer.inner.decode(output)
    assert len(output) > 400 and tokenizer.longest_decode <= 24  # the prompt-context search may try 24


@PATHS
@pytest.mark.parametrize("wrapped", [False, True], ids=["tokenizers.Tokenizer", "transformers"])
def test_small_byte_level_bpe(byte_level_bpe, use_decode_stream, wrapped):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe) if wrapped else byte_level_bpe
    rng = random.Random(7)
    for text in TEXTS + ["<s>a <tool> b</s> c"]:
        ids = encode(tokenizer, text)
        for _ in range(5):
            cut = rng.randrange(len(ids))
            stream_and_check(tokenizer, ids[:cut], ids[cut:], decode(tokenizer, ids[cut:]),
                             use_decode_stream=use_decode_stream)
    for _ in range(100):
        ids = [rng.randrange(vocab_size(tokenizer)) for _ in range(rng.randrange(1, 30))]
        cut = rng.randrange(len(ids))
        stream_and_check(tokenizer, ids[:cut], ids[cut:], decode(tokenizer, ids[cut:]),
                         use_decode_stream=use_decode_stream)


@PATHS
def test_sentencepiece_style_keeps_the_space_the_prompt_context_implies(sentencepiece_style,
                                                                          use_decode_stream):
    tok = sentencepiece_style
    # Decoded alone, the first output token would lose its leading space; after the prompt it keeps it.
    prompt, output = encode(tok, "hello"), encode(tok, "hello world")[len(encode(tok, "hello")):]
    assert decode(tok, output) == "world"
    assert "".join(stream_and_check(tok, prompt, output, " world", use_decode_stream=use_decode_stream)) \
        == " world"
    rng = random.Random(3)
    for text in TEXTS:
        ids = encode(tok, text)  # unknown characters become <0xNN> byte tokens
        for cut in sorted(rng.sample(range(1, len(ids)), min(6, len(ids) - 1))):
            prompt_text = decode(tok, ids[:cut])
            if REPLACEMENT in prompt_text:  # prompt ends inside a character: output decodes alone
                expected = decode(tok, ids[cut:])
            else:
                expected = decode(tok, ids)[len(prompt_text):]
            stream_and_check(tok, ids[:cut], ids[cut:], expected, use_decode_stream=use_decode_stream)


def test_sentencepiece_style_decode_token_restores_the_leading_space(sentencepiece_style):
    tok = sentencepiece_style
    piece = max((p for p in tok.get_vocab() if p.startswith("▁") and p[1:].isalpha()), key=len)
    token_id, word = tok.convert_tokens_to_ids(piece), piece[1:]
    assert decode(tok, [token_id]) == word  # the decoder strips a lone token's leading space
    assert IncrementalDetokenizer(tok, []).decode_token(token_id) == " " + word
