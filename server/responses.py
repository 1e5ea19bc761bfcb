"""Response and streaming-chunk models, shaped as in OpenAI's API reference (plus vLLM's stop_reason)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, field_serializer


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # --enable-prompt-tokens-details

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> UsageInfo:
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


# --- Completions -------------------------------------------------------------------------------
class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's, in whole responses only
    # vLLM's return_token_ids: the prompt's ids (a stream's first chunk of the choice) and the generated ids
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# --- Chat --------------------------------------------------------------------------------------
class FunctionCallOut(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallOut(BaseModel):
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: FunctionCallOut
    index: int | None = None  # only in streaming deltas


class ChatMessageOut(BaseModel):
    role: str
    content: str | None = None
    reasoning_content: str | None = None  # --reasoning-parser: the model's thinking
    tool_calls: list[ToolCallOut] = Field(default_factory=list)

    @field_serializer("tool_calls")
    def _without_index(self, calls: list[ToolCallOut]) -> list[dict]:
        return [c.model_dump(exclude={"index"}) for c in calls]  # `index` belongs to streamed deltas


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobContent] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids: the delta's generated ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids, in the first chunk

    def to_sse(self) -> str:
        data = self.model_dump(exclude={"choices"})
        _drop_nones(data, "usage", "prompt_token_ids")
        # Deltas carry only what changed, like OpenAI's own chunks.
        data["choices"] = [_drop_nones({**c.model_dump(exclude={"delta"}),
                                        "delta": c.delta.model_dump(exclude_none=True)}, "token_ids")
                           for c in self.choices]
        return sse(data)


class CompletionChunk(CompletionResponse):
    def to_sse(self) -> str:
        data = self.model_dump(exclude={"choices": {"__all__": {"prompt_logprobs"}}})
        _drop_nones(data, "usage")
        for choice in data["choices"]:
            _drop_nones(choice, "prompt_token_ids", "token_ids")
        return sse(data)


def _drop_nones(data: dict, *keys: str) -> dict:
    """A chunk's optional fields are left out unless set (vLLM's chunks and OpenAI's alike)."""
    for key in keys:
        if data.get(key) is None:
            data.pop(key, None)
    return data


def sse(data: Any) -> str:
    import json
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# --- Models, tokenize ----------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "jaxserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
