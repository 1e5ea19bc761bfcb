"""Request models of OpenAI's Completions and Chat Completions APIs plus vLLM's extra parameters.

Field names, types and defaults follow the OpenAI API reference (and vLLM's `extra_body` names).
`to_sampling_params()` turns a validated request into the engine's `SamplingParams` (what the request leaves
unset takes the model's generation_config.json defaults, then OpenAI's); anything the
engine cannot do is refused with a 400 naming the parameter instead of being silently ignored.
"""
from __future__ import annotations

import functools
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jaxserve.beam_search import BeamSearchParams
from jaxserve.sampling_params import GuidedDecodingParams, RequestOutputKind, SamplingParams, truncate_prompt
from jaxserve.server.errors import ParamError, bad_request

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


class OpenAIModel(BaseModel):
    # Unknown fields are kept (and logged by the app), as OpenAI and vLLM accept them.
    # NaN and Infinity (which Python's JSON parser accepts) are refused with a 400.
    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI documents its optional parameters as nullable, and its Python client sends a `None` argument as
        null: an explicit null takes the default of a field that has no meaning for None (`"n": null` is n=1)."""
        if not isinstance(data, dict):
            return data
        defaulted = _defaulted_when_null(cls)
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}


@functools.cache
def _defaulted_when_null(model: type[BaseModel]) -> frozenset[str]:
    """The keys (names and aliases) of a model's optional fields whose type does not take None."""
    def allows_none(annotation: Any) -> bool:
        return annotation is Any or annotation is None or type(None) in typing.get_args(annotation)
    return frozenset(key for name, f in model.model_fields.items()
                     if not f.is_required() and not allows_none(f.annotation) for key in (name, f.alias) if key)


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False  # OpenAI's and vLLM's: no usage chunk unless asked for
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(OpenAIModel):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(OpenAIModel):
    """vLLM's newer spelling of guided decoding: exactly one of these constraints."""
    json_: str | dict | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None


class _GenerationRequest(OpenAIModel):
    """Parameters shared by both APIs (OpenAI's and vLLM's sampling extras)."""

    model: str | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    n: int = 1
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)  # int64, as vLLM
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    early_stopping: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: the context length)
    prompt_logprobs: int | None = None
    # Logprob tokens as "token_id:{id}" (None: the server's --return-tokens-as-token-ids)
    return_tokens_as_token_ids: bool | None = None
    # The prompt's and the generated token ids beside the text (vLLM's, for RL rollouts)
    return_token_ids: bool | None = None
    # Prefix-cache pages are shared only between requests with the same salt (vLLM's tenant isolation)
    cache_salt: str | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputs | None = None
    request_id: str | None = None
    # With --scheduling-policy priority: lower goes first (else anything but 0 is refused, as in vLLM)
    priority: int = 0
    # Refused unless empty: no custom logits processors
    logits_processors: list[Any] | None = None

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, temperature: float | None) -> float | None:
        # OpenAI's range (and vLLM's); below 0 is the sampler's own check
        if temperature is not None and temperature > 2:
            raise ValueError(f"temperature must be in [0, 2], got {temperature}.")
        return temperature

    @field_validator("cache_salt")
    @classmethod
    def _check_cache_salt(cls, salt: str | None) -> str | None:
        if salt is not None and not salt:
            raise ValueError("cache_salt must be a non-empty string when given")
        return salt

    @property
    def guided_param(self) -> str | None:
        """The parameter that asks for guided decoding, which an error in its constraint names."""
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
            if getattr(self, name) is not None:
                return name
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        return None

    def engine_prompt(self, text: str | None, token_ids: list[int]) -> dict:
        """What the engine gets for one prompt."""
        prompt = {"prompt_token_ids": token_ids, "prompt": text}
        if self.cache_salt is not None:
            prompt["cache_salt"] = self.cache_salt
        if self.priority:
            prompt["priority"] = self.priority
        return prompt

    @model_validator(mode="after")
    def _check_stream_options(self):
        # An empty object passes, as in vLLM (it checks the options' truthiness).
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            raise ParamError("stream_options can only be set when stream is true", "stream_options")
        return self

    def truncated(self, prompt_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's tokens as the engine gets them: the last truncate_prompt_tokens of them."""
        try:
            return truncate_prompt(prompt_ids, self.truncate_prompt_tokens, max_model_len)
        except ValueError as exc:
            raise bad_request(str(exc), "truncate_prompt_tokens")

    # --- pieces of to_sampling_params -------------------------------------------------------
    def _refuse_unsupported(self) -> None:
        if self.logits_processors:
            raise bad_request("logits_processors (custom logits processors) are not supported by jaxserve.",
                              "logits_processors")
        if self.stream and self.prompt_logprobs is not None:  # a stream's chunks have no place for them
            raise bad_request("prompt_logprobs are not available when streaming (stream=true).", "prompt_logprobs")
        if self.use_beam_search:
            return
        if self.length_penalty != 1.0:
            raise bad_request("length_penalty only applies to beam search (use_beam_search).", "length_penalty")
        if self.early_stopping:
            raise bad_request("early_stopping only applies to beam search (use_beam_search).", "early_stopping")

    def _beam_search_params(self, *, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                            guided: GuidedDecodingParams | None) -> BeamSearchParams:
        """use_beam_search: `n` is the beam width (as in vLLM). What would change the search's outcome but
        it cannot honour is refused; sampling knobs (temperature, top_p, top_k, min_p, seed) have no
        meaning for it and are ignored, as vLLM does."""
        if guided is not None:
            given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                       "response_format", "structured_outputs") if getattr(self, name) is not None]
            param = given[0] if given else "tools"
            raise bad_request(f"{param} (guided decoding) is not supported with use_beam_search.", param)
        refused = {"stop": bool(self.stop), "best_of": self.best_of not in (None, self.n),
                   "presence_penalty": bool(self.presence_penalty),
                   "frequency_penalty": bool(self.frequency_penalty),
                   "repetition_penalty": self.repetition_penalty not in (None, 1.0),
                   "logit_bias": bool(self.logit_bias), "allowed_token_ids": self.allowed_token_ids is not None,
                   "bad_words": bool(self.bad_words)}
        for name, present in refused.items():
            if present:
                raise bad_request(f"{name} is not supported with use_beam_search.", name)
        return BeamSearchParams(
            beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
            temperature=self.temperature if self.temperature is not None else 0.0,
            length_penalty=self.length_penalty, early_stopping=self.early_stopping, min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias")
            if not -100.0 <= value <= 100.0:
                raise bad_request(f"logit_bias values must be in [-100, 100], got {value}.", "logit_bias")
            out[token] = value
        return out

    def guided_decoding(self, extra: GuidedDecodingParams | None = None) -> GuidedDecodingParams | None:
        """Merge guided_*, response_format, structured_outputs (and tools' constraint) into one."""
        found: list[tuple[str, str, Any]] = []  # (parameter, constraint kind, value)
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                found.append((f"guided_{kind}", kind, value))
        if self.response_format is not None and self.response_format.type != "text":
            if self.response_format.type == "json_object":
                found.append(("response_format", "json_object", True))
            else:
                spec = self.response_format.json_schema
                if spec is None or spec.json_schema is None:
                    raise bad_request("response_format of type json_schema needs json_schema.schema.",
                                      "response_format")
                found.append(("response_format", "json", spec.json_schema))
        so = self.structured_outputs
        if so is not None:
            for kind, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                ("grammar", so.grammar), ("json_object", so.json_object or None)):
                if value is not None:
                    found.append(("structured_outputs", kind, value))
            if not any(param == "structured_outputs" for param, _, _ in found):  # asked for, but no constraint
                raise bad_request("structured_outputs needs one constraint: json, regex, choice, grammar or "
                                  "json_object.", "structured_outputs")
        if extra is not None:
            found.extend(("tools", kind, None) for kind in extra.constraint_kinds())
        if len(found) > 1:
            names = ", ".join(sorted({f"{p} ({k})" for p, k, _ in found}))
            raise bad_request(f"Only one kind of guided decoding may be used per request, got: {names}.",
                              found[1][0])
        if extra is not None and found:
            return extra
        if not found:
            return None
        param, kind, value = found[0]
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise bad_request(f"{param} is not valid JSON: {exc}", param)
        if kind == "choice" and not value:
            raise bad_request(f"{param} must list at least one choice.", param)
        params = GuidedDecodingParams(
            backend=self.guided_decoding_backend,
            whitespace_pattern=self.guided_whitespace_pattern or (so.whitespace_pattern if so else None))
        if kind == "json_object":
            params.json_object = True
        else:
            setattr(params, kind, value)
        return params

    def _sampling_params(self, *, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None, guided: GuidedDecodingParams | None,
                         defaults: dict) -> SamplingParams | BeamSearchParams:
        self._refuse_unsupported()
        if self.use_beam_search:
            return self._beam_search_params(max_tokens=max_tokens, logprobs=logprobs,
                                            prompt_logprobs=prompt_logprobs, guided=guided)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

        def unset(name: str, default):  # the request's, else the model's generation_config.json, else OpenAI's
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, default)

        return SamplingParams(
            n=self.n, best_of=self.best_of,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=unset("repetition_penalty", 1.0),
            temperature=unset("temperature", DEFAULT_TEMPERATURE),
            top_p=unset("top_p", DEFAULT_TOP_P),
            top_k=unset("top_k", -1),
            min_p=unset("min_p", 0.0),
            seed=self.seed, stop=stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            logit_bias=self._logit_bias(), allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, truncate_prompt_tokens=self.truncate_prompt_tokens,
            guided_decoding=guided,
            # The server always consumes deltas: it streams them, or accumulates them while
            # timing first token / inter-token latency for /metrics.
            output_kind=RequestOutputKind.DELTA)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage_in_stream(self) -> bool:
        """stream_options.continuous_usage_stats: every chunk carries its choice's usage so far."""
        return self.include_usage_in_stream and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default; an explicit null means "up to the context limit"
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True
    prompt_embeds: Any = None  # vLLM's embeddings in place of tokens: refused

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0 (vLLM's prompt scoring, as lm-eval's loglikelihood uses): the reply
        is the prompt alone; the engine still runs one step, which computes the prompt logprobs."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, max_tokens: int | None,
                           defaults: dict | None = None) -> SamplingParams | BeamSearchParams:
        if self.suffix:
            raise bad_request("suffix (insertion / fill-in-the-middle) is not supported by jaxserve.",
                              "suffix")
        if self.prompt_embeds is not None:
            raise bad_request("prompt_embeds is not supported by jaxserve: send the prompt as text or token ids.",
                              "prompt_embeds")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise bad_request("best_of greater than n is not supported when streaming.", "best_of")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        return self._sampling_params(max_tokens=max_tokens, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs,
                                     guided=self.guided_decoding(), defaults=defaults or {})


class FunctionCall(OpenAIModel):
    name: str
    arguments: str | dict | None = None


class ToolCall(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    # Any role, as in vLLM: the chat template decides what a custom role means.
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = 0
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    # vLLM extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None
    include_reasoning: bool = True  # with --reasoning-parser: whether reasoning_content is returned

    @model_validator(mode="after")
    def _check_chat(self):
        if not self.messages:
            raise ParamError("messages must contain at least one message", "messages")
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise ParamError("continue_final_message and add_generation_prompt cannot both be true",
                             "continue_final_message")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def effective_tool_choice(self) -> str | dict:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def to_sampling_params(self, max_tokens: int | None, tool_guided: GuidedDecodingParams | None = None,
                           defaults: dict | None = None) -> SamplingParams | BeamSearchParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
                                     guided=self.guided_decoding(tool_guided), defaults=defaults or {})


class TokenizeRequest(OpenAIModel):
    """POST /tokenize: either `prompt` (completions style) or `messages` (chat style)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("give exactly one of prompt or messages", "prompt")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]
