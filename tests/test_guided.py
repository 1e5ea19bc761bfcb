"""Guided decoding matchers driven by a simulated model over the real SmolLM2 tokenizer."""
from __future__ import annotations

import importlib.util
import json
import re
import time

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jaxserve.guided import (GuidedDecodingCompiler, allocate_bitmask, apply_bitmask_jax, apply_bitmask_numpy,
                             bitmask_to_allowed, bitmask_to_allowed_numpy, bitmask_width)
from jaxserve.models.weights import load_tokenizer, resolve_model_source
from jaxserve.sampling_params import GuidedDecodingParams as G

MODEL_VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_source(None))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GuidedDecodingCompiler(tokenizer, MODEL_VOCAB)


@pytest.fixture(scope="module")
def preference(tokenizer):
    """A fake model's taste: likes closing punctuation, EOS and short tokens, dislikes runs of blanks,
    so random walks through a grammar end in a few dozen tokens instead of thousands."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    score = np.zeros(MODEL_VOCAB, dtype=np.float64)
    for i, t in enumerate(texts):
        if any(c in t for c in "\"}],"):
            score[i] += 4.0
        if len(t) <= 2:
            score[i] += 1.5
        if t and not t.strip():
            score[i] -= 4.0
    score[tokenizer.eos_token_id] += 6.0
    return score


def generate(matcher, tokenizer, preference, seed, max_steps=300):
    """Sample from the bitmask like the engine would; returns the decoded text."""
    rng = np.random.default_rng(seed)
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    out = []
    for _ in range(max_steps):
        if matcher.is_terminated():
            break
        matcher.fill_bitmask(bitmask[0])
        allowed = bitmask_to_allowed_numpy(bitmask[0], MODEL_VOCAB)
        assert allowed.any(), "the grammar left no token allowed"
        scores = np.where(allowed, preference + rng.gumbel(size=MODEL_VOCAB), -np.inf)
        tok = int(np.argmax(scores))
        assert matcher.accept_token(tok), f"an allowed token {tok} was rejected"
        if tok == tokenizer.eos_token_id:
            break
        out.append(tok)
    assert matcher.is_terminated(), "no termination within the step budget"
    assert matcher.error is None
    return tokenizer.decode(out)


# ---------------------------------------------------------------- bitmask helpers
@pytest.mark.parametrize("vocab", [32, 45, 1000])
def test_bitmask_unpacking_jax_matches_numpy(vocab):
    rng = np.random.default_rng(vocab)
    bitmask = rng.integers(-2**31, 2**31, size=(3, bitmask_width(vocab)), dtype=np.int64).astype(np.int32)
    expected = np.array([[(int(bitmask[s, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for s in range(3)], bool)
    np.testing.assert_array_equal(bitmask_to_allowed_numpy(bitmask, vocab), expected)
    got = jax.jit(bitmask_to_allowed, static_argnums=1)(jnp.asarray(bitmask), vocab)
    np.testing.assert_array_equal(np.asarray(got), expected)
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    np.testing.assert_array_equal(apply_bitmask_numpy(logits, bitmask), np.where(expected, logits, -np.inf))
    np.testing.assert_array_equal(np.asarray(apply_bitmask_jax(jnp.asarray(logits), jnp.asarray(bitmask))),
                                  np.where(expected, logits, -np.inf))


def test_all_allowed_bitmask_leaves_logits_untouched():
    logits = np.arange(70, dtype=np.float32).reshape(1, 70)
    np.testing.assert_array_equal(apply_bitmask_numpy(logits, allocate_bitmask(1, 70)), logits)


# ---------------------------------------------------------------- constraints, driven to completion
def test_choice_outputs_are_choices(compiler, tokenizer, preference):
    choices = ["positive", "negative", "neutral", "Paris, France", "a \"quoted\" one"]
    seen = set()
    for seed in range(12):
        text = generate(compiler.matcher_for(G(choice=choices)), tokenizer, preference, seed)
        assert text in choices
        seen.add(text)
    assert len(seen) > 1  # the fake model really explores


@pytest.mark.parametrize("pattern", [
    # (ASCII classes: Rust's \d and \w follow a newer Unicode than Python's `re`, so exotic digits differ.)
    r"[a-z]{3,8}", r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,6} [0-9]{1,3}",
    r"[a-z0-9_]{1,8}@[a-z]{1,8}\.(com|org)", r"(0|[1-9][0-9]*)\.[0-9]{2}",
])
def test_regex_outputs_fully_match(compiler, tokenizer, preference, pattern):
    for seed in range(4):
        text = generate(compiler.matcher_for(G(regex=pattern)), tokenizer, preference, seed)
        assert re.fullmatch(pattern, text), (pattern, text)


SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "address": {"type": "object", "properties": {"city": {"type": "string"}},
                                               "required": ["city"]}}, "required": ["id", "address"]}},
               "required": ["user"]},
    "array_of_strings": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "bounded_int": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99}},
                    "required": ["n"]},
    "bounded_number": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5,
                                                              "exclusiveMaximum": 2.5}}, "required": ["x"]},
    "string_pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                       "required": ["code"]},
    "string_length": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}},
                      "required": ["s"]},
    "booleans_and_null": {"type": "object", "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
                          "required": ["ok", "nothing"]},
    "array_of_objects": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
        "k": {"type": "string", "enum": ["a", "b"]}, "v": {"type": "integer"}}, "required": ["k", "v"]}},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string",
                                                                                           "maxLength": 3}]}},
               "required": ["value"]},
    "refs": {"type": "object", "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                                   "y": {"type": "integer"}},
                                                   "required": ["x", "y"]}},
             "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}}, "required": ["a", "b"]},
    "const_and_optional": {"type": "object", "properties": {"kind": {"const": "event"}, "tags": {
        "type": "array", "items": {"type": "string"}}}, "required": ["kind"]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(compiler, tokenizer, preference, name):
    schema = SCHEMAS[name]
    for seed in range(3):
        text = generate(compiler.matcher_for(G(json=schema)), tokenizer, preference, seed)
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_given_as_string(compiler, tokenizer, preference):
    schema = SCHEMAS["enum"]
    text = generate(compiler.matcher_for(G(json=json.dumps(schema))), tokenizer, preference, 0)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_gives_an_object(compiler, tokenizer, preference):
    for seed in range(4):
        assert isinstance(json.loads(generate(compiler.matcher_for(G(json_object=True)), tokenizer, preference,
                                              seed)), dict)


def _blank_tokens_allowed(matcher, tokenizer, prefix):
    assert matcher.accept_tokens(tokenizer.encode(prefix, add_special_tokens=False))
    row = allocate_bitmask(1, MODEL_VOCAB)[0]
    matcher.fill_bitmask(row)
    allowed = bitmask_to_allowed_numpy(row, MODEL_VOCAB)
    return [t for t in ("\n", " ", "\t") if allowed[tokenizer.convert_tokens_to_ids(
        tokenizer.convert_ids_to_tokens(tokenizer.encode(t, add_special_tokens=False))[0])]]


def test_whitespace_pattern_is_honoured(compiler, tokenizer, preference):
    schema = SCHEMAS["array_of_objects"]
    # Default: compact or pretty printed — a space, or a newline (then an indent), never a bare tab.
    assert _blank_tokens_allowed(compiler.matcher_for(G(json=schema)), tokenizer, "[") == ["\n", " "]
    assert _blank_tokens_allowed(compiler.matcher_for(G(json=schema, whitespace_pattern=" ?")), tokenizer,
                                 "[") == [" "]
    assert _blank_tokens_allowed(compiler.matcher_for(G(json=schema, backend="llguidance:disable-any-whitespace")),
                                 tokenizer, "[") == []
    # A model that loves blanks still finishes valid JSON, each gap one space or a newline and an indent, and
    # produces compact JSON under an empty pattern (no free-form strings here, where blanks are content).
    schema = {"type": "array", "maxItems": 3, "items": {"type": "object", "additionalProperties": False,
              "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "integer"}}, "required": ["k", "v"]}}
    blank_lover = preference.copy()
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    blank_lover[[i for i, t in enumerate(texts) if t and not t.strip()]] += 12.0
    padded = generate(compiler.matcher_for(G(json=schema)), tokenizer, blank_lover, 1, max_steps=2000)
    gaps = re.findall(r"\s+", padded)
    assert gaps and all(re.fullmatch(r" |\n[ \t]{0,32}", gap) for gap in gaps), padded
    jsonschema.validate(json.loads(padded), schema)
    tight = generate(compiler.matcher_for(G(json=schema, whitespace_pattern="")), tokenizer, blank_lover, 1)
    assert not re.search(r"\s", tight), tight
    jsonschema.validate(json.loads(tight), schema)


LARK_ARITH = """
?start: sum
?sum: product | sum "+" product | sum "-" product
?product: atom | product "*" atom
?atom: NUMBER | "(" sum ")"
NUMBER: /[0-9]{1,3}/
"""


def test_lark_grammar_outputs_parse(compiler, tokenizer, preference):
    import lark

    parser = lark.Lark(LARK_ARITH, start="start")
    for seed in range(6):
        text = generate(compiler.matcher_for(G(grammar=LARK_ARITH)), tokenizer, preference, seed)
        parser.parse(text)  # raises on anything outside the grammar


GBNF_SQL = r'''
root ::= "SELECT " cols " FROM " table where?
cols ::= col (", " col)*
col ::= "id" | "name" | "price"
table ::= [a-z]+
where ::= " WHERE " col " = " [0-9]+
'''


def test_gbnf_grammar_is_detected_and_enforced(compiler, tokenizer, preference):
    pattern = r"SELECT (id|name|price)(, (id|name|price))* FROM [a-z]+( WHERE (id|name|price) = [0-9]+)?"
    for seed in range(6):
        text = generate(compiler.matcher_for(G(grammar=GBNF_SQL)), tokenizer, preference, seed)
        assert re.fullmatch(pattern, text), text


def test_structural_tag_constrains_only_inside_the_tag(compiler, tokenizer):
    tag = {"type": "structural_tag", "triggers": ["<function="],
           "structures": [{"begin": "<function=get_weather>", "schema": SCHEMAS["flat"], "end": "</function>"}]}
    m = compiler.matcher_for(G(structural_tag=json.dumps(tag)))
    prefix = tokenizer.encode("Sure. <function=get_weather>", add_special_tokens=False)
    assert m.accept_tokens(prefix) == len(prefix)
    assert m.validate_tokens(tokenizer.encode("hello", add_special_tokens=False)) == 0  # JSON must follow
    body = tokenizer.encode('{"name": "Bo", "age": 3}</function>', add_special_tokens=False)
    assert m.accept_tokens(body) == len(body)


# ---------------------------------------------------------------- termination, rollback, vocab edges
def test_complete_grammar_allows_only_eos(compiler, tokenizer):
    m = compiler.matcher_for(G(choice=["yes", "no"]))
    assert m.accept_tokens(tokenizer.encode("yes", add_special_tokens=False))
    assert m.is_terminated() and m.is_accepting()
    row = allocate_bitmask(1, MODEL_VOCAB)[0]
    m.fill_bitmask(row)
    assert np.flatnonzero(bitmask_to_allowed_numpy(row, MODEL_VOCAB)).tolist() == [tokenizer.eos_token_id]


def test_open_ended_regex_allows_eos_and_more(compiler, tokenizer):
    m = compiler.matcher_for(G(regex=r"[a-z]+"))
    m.accept_tokens(tokenizer.encode("abc", add_special_tokens=False))
    assert m.is_accepting() and not m.is_terminated()
    row = allocate_bitmask(1, MODEL_VOCAB)[0]
    m.fill_bitmask(row)
    allowed = bitmask_to_allowed_numpy(row, MODEL_VOCAB)
    assert allowed[tokenizer.eos_token_id] and allowed.sum() > 10
    assert m.accept_token(tokenizer.eos_token_id) and m.is_terminated()


def test_rejected_token_reports_error(compiler, tokenizer):
    m = compiler.matcher_for(G(regex=r"[0-9]+"))
    assert not m.accept_token(tokenizer.encode("abc", add_special_tokens=False)[0])
    assert m.error and m.is_terminated()


def test_rollback_restores_the_mask(compiler, tokenizer):
    m = compiler.matcher_for(G(json=SCHEMAS["flat"]))
    before, after = allocate_bitmask(2, MODEL_VOCAB)
    m.fill_bitmask(before)
    toks = tokenizer.encode('{"name": "x', add_special_tokens=False)
    assert m.accept_tokens(toks) == len(toks)
    m.rollback(len(toks))
    m.fill_bitmask(after)
    np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError):
        m.rollback(1)


def test_model_vocab_larger_than_tokenizer_disallows_padding(tokenizer):
    big = GuidedDecodingCompiler(tokenizer, MODEL_VOCAB + 70)
    row = allocate_bitmask(1, MODEL_VOCAB + 70)[0]
    big.matcher_for(G(json_object=True)).fill_bitmask(row)
    allowed = bitmask_to_allowed_numpy(row, MODEL_VOCAB + 70)
    assert allowed[:MODEL_VOCAB].any() and not allowed[MODEL_VOCAB:].any()
    assert not big.matcher_for(G(json_object=True)).accept_token(MODEL_VOCAB + 5)


def test_model_vocab_smaller_than_tokenizer_truncates(compiler, tokenizer):
    small = GuidedDecodingCompiler(tokenizer, 1000)  # odd sizes: 1000 is not a multiple of 32
    row = allocate_bitmask(1, 1000)[0]
    small.matcher_for(G(regex=r"[a-z ]+")).fill_bitmask(row)
    full = allocate_bitmask(1, MODEL_VOCAB)[0]
    compiler.matcher_for(G(regex=r"[a-z ]+")).fill_bitmask(full)
    np.testing.assert_array_equal(bitmask_to_allowed_numpy(row, 1000), bitmask_to_allowed_numpy(full, 1000))
    assert not bitmask_to_allowed_numpy(row, 32 * len(row))[1000:].any()


def test_batched_fill_matches_row_by_row(compiler, tokenizer):
    params = [G(json=SCHEMAS["nested"]), G(regex=r"\d+"), G(choice=["a", "b"])]
    matchers = [compiler.matcher_for(p) for p in params]
    matchers[0].accept_tokens(tokenizer.encode('{"user": {', add_special_tokens=False))
    batched = allocate_bitmask(5, MODEL_VOCAB)
    compiler.fill_bitmasks([(m, i * 2) for i, m in enumerate(matchers)], batched)
    for i, m in enumerate(matchers):
        single = allocate_bitmask(1, MODEL_VOCAB)[0]
        m.fill_bitmask(single)
        np.testing.assert_array_equal(batched[i * 2], single)
    np.testing.assert_array_equal(batched[1], -1)  # unguided rows untouched
    np.testing.assert_array_equal(batched[3], -1)


# ---------------------------------------------------------------- errors and caching
@pytest.mark.parametrize("params, needle", [
    (G(json={"type": "foo"}), "Invalid JSON schema: Invalid type: foo"),
    (G(json='{"type": "object",'), "Invalid JSON schema: not valid JSON"),
    (G(json={"type": "string", "pattern": "(("}), "unclosed group"),
    (G(regex="a{3"), "Invalid regex"),
    (G(regex="(("), "unclosed group"),
    (G(choice=[]), "non-empty list of strings"),
    (G(grammar="start: foo"), "unknown name: \"foo\""),
    (G(grammar='root ::= "a" missing'), "Rule 'missing' not found"),
    (G(grammar="root ::= [a-z"), "Invalid GBNF grammar"),
    (G(regex="a", choice=["a"]), "Exactly one guided decoding constraint"),
    (G(), "got none"),
    (G(regex="a", backend="xgrammar"), "not available"),
    (G(regex="a", backend="llguidance:bogus"), "Unknown guided decoding backend option"),
])
def test_invalid_constraints_raise_value_error_naming_the_problem(compiler, params, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        compiler.matcher_for(params)


def test_grammars_are_cached_and_evicted(tokenizer):
    c = GuidedDecodingCompiler(tokenizer, MODEL_VOCAB, cache_size=2)
    c.matcher_for(G(json={"type": "object", "b": 1}))
    c.matcher_for(G(json='{ "type":"object",\n "b": 1 }'))  # same schema, other spelling → hit
    assert (c.cache_hits, c.cache_misses) == (1, 1)
    c.matcher_for(G(regex="x+"))
    c.matcher_for(G(regex="y+"))  # evicts the schema
    c.matcher_for(G(json={"type": "object", "b": 1}))
    assert c.cache_info() == {"hits": 1, "misses": 4, "size": 2, "max_size": 2}
    # Matchers from one cached grammar keep separate state.
    a, b = c.matcher_for(G(regex="y+")), c.matcher_for(G(regex="y+"))
    a.accept_tokens(tokenizer.encode("yy", add_special_tokens=False))
    assert a.is_accepting() and not b.is_accepting()


def test_host_cost_per_token_for_a_json_schema(compiler, tokenizer, preference):
    """Report fill_bitmask + accept_token cost per token; the bound only catches pathological slowness."""
    m = compiler.matcher_for(G(json=SCHEMAS["nested"]))
    rng = np.random.default_rng(0)
    row = allocate_bitmask(1, MODEL_VOCAB)[0]
    fill_s = accept_s = 0.0
    steps = 0
    while not m.is_terminated() and steps < 300:
        t0 = time.perf_counter()
        m.fill_bitmask(row)
        t1 = time.perf_counter()
        allowed = bitmask_to_allowed_numpy(row, MODEL_VOCAB)
        tok = int(np.argmax(np.where(allowed, preference + rng.gumbel(size=MODEL_VOCAB), -np.inf)))
        t2 = time.perf_counter()
        assert m.accept_token(tok)
        accept_s += time.perf_counter() - t2
        fill_s += t1 - t0
        steps += 1
    print(f"\njson schema: {steps} tokens, fill_bitmask {1e6 * fill_s / steps:.0f} us/token, "
          f"accept_token {1e6 * accept_s / steps:.0f} us/token")
    assert (fill_s + accept_s) / steps < 0.05


# ---------------------------------------------------------------- the optional outlines-core backend
@pytest.fixture(scope="module")
def outlines_compiler(tokenizer):
    pytest.importorskip("outlines_core")
    return GuidedDecodingCompiler(tokenizer, MODEL_VOCAB, backend="outlines")


def test_outlines_choice_regex_and_json(outlines_compiler, tokenizer, preference):
    for seed in range(3):
        assert generate(outlines_compiler.matcher_for(G(choice=["red", "green"])), tokenizer, preference,
                        seed) in ("red", "green")
        text = generate(outlines_compiler.matcher_for(G(regex=r"[0-9]{3}-[a-z]{2,4}")), tokenizer, preference, seed)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text)
        # (not "bounded_int": outlines-core's schema→regex ignores integer minimum/maximum)
        for name in ("flat", "enum", "nested", "array_of_objects"):
            text = generate(outlines_compiler.matcher_for(G(json=SCHEMAS[name])), tokenizer, preference, seed)
            jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_outlines_per_request_backend_and_termination(compiler, tokenizer):
    m = compiler.matcher_for(G(choice=["yes", "no"], backend="outlines"))
    assert type(m).__name__ == "OutlinesMatcher"
    toks = tokenizer.encode("yes", add_special_tokens=False)
    assert m.accept_tokens(toks) == len(toks) and m.is_terminated() and m.is_accepting()
    row = allocate_bitmask(1, MODEL_VOCAB)[0]
    m.fill_bitmask(row)
    assert np.flatnonzero(bitmask_to_allowed_numpy(row, MODEL_VOCAB)).tolist() == [tokenizer.eos_token_id]
    m.rollback(len(toks))
    assert not m.is_accepting() and m.validate_tokens(toks) == len(toks)
    assert not m.accept_token(tokenizer.encode("maybe", add_special_tokens=False)[0]) and m.error


@pytest.mark.parametrize("params, needle", [
    (G(grammar="start: \"a\""), "does not support grammar"),
    (G(regex="(("), "Invalid regex"),
    (G(json={"type": "foo"}), "Invalid JSON schema"),
])
def test_outlines_errors(outlines_compiler, params, needle):
    with pytest.raises(ValueError, match=needle):
        outlines_compiler.matcher_for(params)


def test_outlines_masks_match_llguidance_for_a_regex(compiler, outlines_compiler, tokenizer):
    a, b = compiler.matcher_for(G(regex=r"(cat|dog)s?")), outlines_compiler.matcher_for(G(regex=r"(cat|dog)s?"))
    rows = allocate_bitmask(2, MODEL_VOCAB)
    for tok in [None] + tokenizer.encode("cat", add_special_tokens=False):
        if tok is not None:
            assert a.accept_token(tok) and b.accept_token(tok)
        a.fill_bitmask(rows[0])
        b.fill_bitmask(rows[1])
        np.testing.assert_array_equal(rows[0], rows[1])


def test_several_eos_tokens_are_all_allowed_at_the_end(tokenizer):
    c = GuidedDecodingCompiler(tokenizer, MODEL_VOCAB, eos_token_ids=[tokenizer.eos_token_id, 0])
    for backend in ("llguidance", "outlines"):
        if backend == "outlines" and not importlib.util.find_spec("outlines_core"):
            continue
        m = c.matcher_for(G(choice=["yes", "no"], backend=backend))
        m.accept_tokens(tokenizer.encode("no", add_special_tokens=False))
        row = allocate_bitmask(1, MODEL_VOCAB)[0]
        m.fill_bitmask(row)
        assert np.flatnonzero(bitmask_to_allowed_numpy(row, MODEL_VOCAB)).tolist() == sorted([0, tokenizer.eos_token_id])
        assert m.accept_token(0) and m.is_terminated() and m.error is None
