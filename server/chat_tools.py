"""Tool calling for chat: which mode a request is in, and tool calls in the API's output shape.

The constraint builders and parsers live in `jaxserve.server.tools` / `jaxserve.server.tool_parsers`;
they are imported lazily so the server still starts (and refuses `tools` with a 400) without them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jaxserve.sampling_params import GuidedDecodingParams
from jaxserve.server.errors import bad_request
from jaxserve.server.protocol import ChatCompletionRequest
from jaxserve.server.responses import FunctionCallOut, ToolCallOut, random_id


@dataclass
class ToolMode:
    kind: str  # "none" | "guided" (required / named function) | "auto" (a tool-call parser decides)
    guided: GuidedDecodingParams | None = None
    parser_name: str | None = None

    def new_parser(self, tokenizer):
        """A fresh parser per choice: streaming parsers keep state."""
        from jaxserve.server.tool_parsers import get_tool_parser
        return get_tool_parser(self.parser_name, tokenizer)


def tool_mode_for(request: ChatCompletionRequest, enable_auto: bool, parser_name: str | None,
                  tokenizer) -> ToolMode:
    choice = request.effective_tool_choice
    if request.tools is not None:
        _check_tools(request.tools)
    if not request.tools:
        if choice not in ("none", "auto"):
            raise bad_request("tool_choice needs tools to choose from.", "tool_choice")
        return ToolMode("none")
    if choice == "none":
        return ToolMode("none")
    if choice == "auto":
        if not (enable_auto and parser_name):
            raise bad_request('"auto" tool choice requires the server to run with --enable-auto-tool-choice '
                              'and --tool-call-parser.', "tool_choice")
        try:
            mode = ToolMode("auto", parser_name=parser_name)
            mode.new_parser(tokenizer)
        except ImportError:
            raise bad_request("tools are not supported by this server build.", "tools")
        except (KeyError, ValueError) as exc:
            raise bad_request(f"tool-call parser {parser_name!r} is unavailable: {exc}", "tools")
        return mode
    if choice != "required" and not (isinstance(choice, dict) and choice.get("type") == "function"):
        raise bad_request(f"tool_choice must be none, auto, required or a named function, got {choice!r}.",
                          "tool_choice")
    try:
        from jaxserve.server.tools import guided_params_for_tools
    except ImportError:
        raise bad_request("tools are not supported by this server build.", "tools")
    try:
        guided = guided_params_for_tools(request.tools, choice, request.parallel_tool_calls)
    except ValueError as exc:
        raise bad_request(str(exc), "tool_choice")
    return ToolMode("guided", guided=guided)


def _check_tools(tools: list) -> None:
    """The tools' shape, whatever tool_choice says: OpenAI and vLLM refuse an empty or malformed list even
    with "none" (the chat template still renders it)."""
    if not tools:
        raise bad_request("Invalid 'tools': empty array. Give at least one tool, or leave tools out.", "tools")
    from jaxserve.server.tools import ToolRequestError, validate_tools
    try:
        validate_tools(tools)
    except ToolRequestError as exc:
        raise bad_request(str(exc), exc.param)


def guided_tool_calls(text: str, request: ChatCompletionRequest) -> list[dict] | None:
    """Tool calls from text generated under the tools constraint; None when it is not parseable
    (for example cut off by max_tokens), in which case the text is returned as content."""
    from jaxserve.server.tools import tool_calls_from_guided_output
    try:
        return tool_calls_from_guided_output(text, request.tools, request.effective_tool_choice)
    except (ValueError, KeyError, TypeError):
        return None


def tool_call_out(call: Any, index: int | None = None) -> ToolCallOut:
    """Normalise a parser's tool call (OpenAI-shaped or {name, arguments}) to the response model."""
    if isinstance(call, ToolCallOut):
        return call
    call = dict(call)
    function = dict(call.get("function") or {k: call[k] for k in ("name", "arguments") if k in call})
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCallOut(id=call.get("id") or random_id("chatcmpl-tool"), type="function",
                       function=FunctionCallOut(name=function.get("name"), arguments=arguments),
                       index=call.get("index", index))
