"""The offline API, named as vLLM's so users can switch: LLM(...).generate / .chat."""
from __future__ import annotations

import itertools
from typing import Any

from tqdm import tqdm

from jaxserve.beam_search import BeamSearchParams, run_beam_search
from jaxserve.config import EngineConfig
from jaxserve.engine import LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.sequence import request_options


class LLM:
    def __init__(self, model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, **engine_args: Any):
        unknown = set(engine_args) - set(EngineConfig.field_names())
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        config = EngineConfig(model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len,
                              seed=seed, **engine_args)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (--generation-config), what
        `generate` uses when given none."""
        defaults = dict(self.engine.default_sampling)
        defaults.setdefault("max_tokens", SamplingParams.max_tokens)
        return SamplingParams(**defaults)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = _prompt_list(prompts)
        params = sampling_params or self.get_default_sampling_params()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("the number of sampling params must equal the number of prompts")
        order = []
        for prompt, p in zip(prompts, params_list):
            p = _final_only(p)
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, p)
            order.append(request_id)
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), disable=not use_tqdm, desc="generating") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[r] for r in order]

    def beam_search(self, prompts, params: BeamSearchParams) -> list[RequestOutput]:
        """Beam search (jaxserve/beam_search.py) for each prompt (text, token ids, or a {"prompt" /
        "prompt_token_ids"} dict): one finished output per prompt holding its params.beam_width best
        sequences, best first."""
        prompts = _prompt_list(prompts)
        params.validate(max_logprobs=self.engine.config.max_logprobs,
                        vocab_size=self.engine.model_config.vocab_size)
        requests = []
        for prompt in prompts:
            text, ids = self.engine.tokenize_prompt(prompt)
            if len(ids) + params.max_tokens > self.engine.max_model_len:
                raise ValueError(f"a prompt of {len(ids)} tokens plus max_tokens={params.max_tokens} exceeds "
                                 f"max_model_len={self.engine.max_model_len}")
            requests.append({"prompt": text, "prompt_token_ids": ids, **request_options(prompt)})
        return run_beam_search(self.engine, requests, params, f"offline-beam-{next(self._ids)}")

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = tok.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message,
                                           **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _prompt_list(prompts) -> list:
    """One prompt (text, token ids or a dict) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return prompts


def _final_only(params: SamplingParams) -> SamplingParams:
    import copy

    params = copy.copy(params)
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params
