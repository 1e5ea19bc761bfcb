"""Chat messages -> prompt text through a Jinja chat template (the model's, the server's or the request's)."""
from __future__ import annotations

import json
import os
from typing import Any

from jaxserve.server.errors import bad_request
from jaxserve.server.protocol import ChatMessage

# Roles the rendered conversation uses; OpenAI's newer "developer" role is a system prompt.
_ROLE_ALIASES = {"developer": "system"}


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a path to a Jinja file, or the Jinja text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    looks_like_path = ("{" not in value and "\n" not in value
                       and (value.endswith((".jinja", ".j2", ".txt")) or os.sep in value))
    if looks_like_path:
        raise ValueError(f"--chat-template file not found: {value}")
    return value


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise bad_request(f"messages[{index}].content: content parts of type {kind!r} are not "
                              "supported (this server serves text-only models).", "messages")
    return "\n".join(texts)


def _arguments_for_template(arguments: Any) -> Any:
    # Most tool-calling templates expect arguments as a mapping, while the API carries a JSON string.
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def conversation_from_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    conversation = []
    for i, msg in enumerate(messages):
        entry: dict[str, Any] = {"role": _ROLE_ALIASES.get(msg.role, msg.role),
                                 "content": _text_of(msg.content, i)}
        if msg.name is not None:
            entry["name"] = msg.name
        if msg.tool_call_id is not None:
            entry["tool_call_id"] = msg.tool_call_id
        if msg.tool_calls:
            entry["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name,
                              "arguments": _arguments_for_template(call.function.arguments)}}
                for call in msg.tool_calls]
        conversation.append(entry)
    return conversation


class ChatTemplateRenderer:
    """Renders conversations with the tokenizer's Jinja engine; `default_template` overrides the model's."""

    def __init__(self, tokenizer, default_template: str | None = None):
        self.tokenizer = tokenizer
        self.default_template = default_template or getattr(tokenizer, "chat_template", None)

    @property
    def has_template(self) -> bool:
        return bool(self.default_template)

    def render(self, messages: list[ChatMessage], *, chat_template: str | None = None,
               chat_template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list[dict] | None = None,
               documents: list[dict] | None = None) -> str:
        template = chat_template or self.default_template
        if not template:
            raise bad_request("This model has no chat template, so chat completions are unavailable; "
                              "start the server with --chat-template or pass chat_template in the "
                              "request (completions still work).", "chat_template")
        conversation = conversation_from_messages(messages)
        if continue_final_message and conversation[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs the last message to be from the assistant.",
                              "continue_final_message")
        kwargs = dict(chat_template_kwargs or {})
        for reserved in ("conversation", "tokenize", "chat_template", "tools", "documents"):
            if reserved in kwargs:
                raise bad_request(f"chat_template_kwargs may not set {reserved!r}.", "chat_template_kwargs")
        try:
            return self.tokenizer.apply_chat_template(
                conversation, chat_template=template, tools=tools, documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **kwargs)
        except Exception as exc:  # jinja2 TemplateError, or a template's own raise_exception()
            raise bad_request(f"Could not render the chat template: {exc}", "messages") from exc
