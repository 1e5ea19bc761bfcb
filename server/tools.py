"""OpenAI `tools` / `tool_choice` on Chat Completions: validation, and guided decoding for forced calls.

`tool_choice="required"` and a named function are enforced with a JSON schema (vLLM's approach):
  - named function f: the output *is* f's arguments object;
  - required: the output is a JSON array of `{"name": <one of the tools>, "parameters": <its schema>}`
    (at most one element when `parallel_tool_calls` is false).
`"auto"` is left to the model and parsed afterwards by a `server.tool_parsers` parser; `"none"` ignores tools.
"""
from __future__ import annotations

import json
from typing import Any

from jaxserve.sampling_params import GuidedDecodingParams
from jaxserve.server.tool_parsers import JsonArrayToolParser, ToolParser, make_tool_call, new_tool_call_id

TOOL_CHOICE_MODES = ("none", "auto", "required")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolRequestError(ValueError):
    """A 400 for the tools/tool_choice part of a request; `param` names the offending field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def validate_tools(tools: Any) -> list[dict]:
    """Check the shape of `tools`; returns them (an empty list when absent)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolRequestError("Invalid type for 'tools': expected an array of tool objects.", "tools")
    names = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolRequestError(f"Invalid value for 'tools[{i}].type': only 'function' tools are supported.",
                                   "tools")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolRequestError(f"Missing required parameter: 'tools[{i}].function.name'.", "tools")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolRequestError(f"Invalid type for 'tools[{i}].function.parameters': expected an object.",
                                   "tools")
        if function["name"] in names:
            raise ToolRequestError(f"Duplicate function name '{function['name']}' in 'tools'.", "tools")
        names.add(function["name"])
    return tools


def normalize_tool_choice(tools: Any, tool_choice: Any, *, auto_tool_choice_enabled: bool = True) -> str | dict:
    """Validate tools + tool_choice together; returns "none" | "auto" | "required" | a named-function dict.

    The default follows OpenAI: "auto" when tools are given, otherwise "none"."""
    tools = validate_tools(tools)
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
        if tool_choice == "auto" and not auto_tool_choice_enabled:
            tool_choice = "none"  # as vLLM: tools are only rendered, nothing is parsed
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICE_MODES:
            raise ToolRequestError(f"Invalid value for 'tool_choice': '{tool_choice}'. Supported values are: "
                                   "'none', 'auto', and 'required', or a named function.", "tool_choice")
        if tool_choice != "none" and not tools:
            raise ToolRequestError("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                                   "are specified.", "tool_choice")
        if tool_choice == "auto" and not auto_tool_choice_enabled:
            raise ToolRequestError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                   "to be set", "tool_choice")
        return tool_choice
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" \
            or not isinstance(tool_choice.get("function"), dict) \
            or not isinstance(tool_choice["function"].get("name"), str):
        raise ToolRequestError("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                               '{"type": "function", "function": {"name": "..."}}.', "tool_choice")
    if not tools:
        raise ToolRequestError("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                               "are specified.", "tool_choice")
    name = tool_choice["function"]["name"]
    if _find_function(tools, name) is None:
        raise ToolRequestError(f"Invalid value for 'tool_choice': function '{name}' was not found in 'tools'.",
                               "tool_choice")
    return tool_choice


def _find_function(tools: list[dict], name: str) -> dict | None:
    return next((t["function"] for t in tools if t["function"]["name"] == name), None)


def _parameters(function: dict) -> dict:
    return function.get("parameters") or EMPTY_PARAMETERS


def named_function(tool_choice: Any) -> str | None:
    return tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None


def required_tools_schema(tools: list[dict], parallel_tool_calls: bool = True) -> dict:
    """The JSON schema of a `tool_choice="required"` answer: an array of calls, name before parameters."""
    options = [{"type": "object",
                "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                               "parameters": _parameters(t["function"])},
                "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


# Between a forced tool call's JSON tokens: at most one space. The JSON is parsed, never shown, and a small
# model given free whitespace spends its max_tokens on newlines before the call is complete.
TOOL_CALL_WHITESPACE = r"\x20?"


def guided_params_for_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None = True, *,
                            auto_tool_choice_enabled: bool = True) -> GuidedDecodingParams | None:
    """The constraint that forces the model's tool calls, or None for "none"/"auto"."""
    choice = normalize_tool_choice(tools, tool_choice, auto_tool_choice_enabled=auto_tool_choice_enabled)
    name = named_function(choice)
    if name is not None:
        return GuidedDecodingParams(json=_parameters(_find_function(tools, name)),
                                    whitespace_pattern=TOOL_CALL_WHITESPACE)
    if choice == "required":
        return GuidedDecodingParams(json=required_tools_schema(tools, parallel_tool_calls is not False),
                                    whitespace_pattern=TOOL_CALL_WHITESPACE)
    return None


def tool_calls_from_guided_output(text: str, tools: Any, tool_choice: Any) -> list[dict]:
    """OpenAI `tool_calls` from a forced answer. A truncated "required" answer (max_tokens hit) yields []
    so the server can return the text as content instead."""
    choice = normalize_tool_choice(tools, tool_choice)
    name = named_function(choice)
    if name is not None:
        return [make_tool_call(name, text.strip())]
    if choice != "required":
        return []
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(calls, list):
        return []
    return [make_tool_call(c["name"], c.get("parameters", {})) for c in calls
            if isinstance(c, dict) and isinstance(c.get("name"), str)]


class NamedFunctionStreamer:
    """Streams a named-function answer: the whole output is the arguments of one call."""

    def __init__(self, name: str):
        self.name = name
        self._id = new_tool_call_id()
        self._args_sent: int | None = None

    @property
    def streamed_tool_calls(self) -> int:
        return 0 if self._args_sent is None else 1

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str) -> dict | None:
        if self._args_sent is None:
            self._args_sent = len(current_text)
            return {"tool_calls": [{"index": 0, "id": self._id, "type": "function",
                                    "function": {"name": self.name, "arguments": current_text}}]}
        if len(current_text) <= self._args_sent:
            return None
        fragment, self._args_sent = current_text[self._args_sent:], len(current_text)
        return {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}

    def finish_streaming(self, current_text: str) -> dict | None:
        return self.extract_tool_calls_streaming("", current_text, "")


def guided_tool_call_streamer(tools: Any, tool_choice: Any) -> NamedFunctionStreamer | ToolParser | None:
    """Per-request streaming converter for a forced answer (same interface as the tool parsers)."""
    choice = normalize_tool_choice(tools, tool_choice)
    name = named_function(choice)
    if name is not None:
        return NamedFunctionStreamer(name)
    return JsonArrayToolParser() if choice == "required" else None
