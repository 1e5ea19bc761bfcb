"""Auto tool-choice parsers: turn a model's own tool-call syntax into OpenAI `tool_calls`.

Create one parser per request (`get_tool_parser(name, tokenizer)`): streaming keeps state.
Streaming is stateless about *text* — every call re-derives the calls from the whole `current_text`
and emits only what was not sent yet — so it is robust to any chunking of the model's output:
first `{"index", "id", "type", "function": {"name", "arguments": ""}}` once the name is complete,
then `{"index", "function": {"arguments": fragment}}` while the argument JSON arrives.
"""
from __future__ import annotations

import ast
import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Callable

_ID_ALPHABET = string.ascii_letters + string.digits
_WS = " \t\r\n"


def new_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def make_tool_call(name: str, arguments: Any) -> dict:
    """An OpenAI `tool_calls` entry; `arguments` is a JSON string (dicts are serialised)."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": new_tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


# ---------------------------------------------------------------- incremental JSON scanning
def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """text[i] == '"'; index after the closing quote, or None if the string is still open."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def json_value_end(text: str, i: int) -> int | None:
    """End index of the JSON value starting at text[i], or None if the text stops inside it."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    # number / true / false / null: runs until a delimiter; at the end of text it may still grow.
    while i < len(text) and text[i] not in ",}]" + _WS:
        i += 1
    return i if i < len(text) else None


@dataclass
class ObjectScan:
    """Top-level fields of a (possibly unfinished) JSON object: key → (value start, value end | None)."""

    fields: dict[str, tuple[int, int | None]]
    end: int | None  # index after '}' once complete
    valid: bool = True


def scan_object(text: str, i: int) -> ObjectScan:
    """Scan the object whose '{' is at text[i] as far as the text goes."""
    fields: dict[str, tuple[int, int | None]] = {}
    i += 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            return ObjectScan(fields, None)
        if text[i] == "}":
            return ObjectScan(fields, i + 1)
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return ObjectScan(fields, None, valid=False)
        key_end = _string_end(text, i)
        if key_end is None:
            return ObjectScan(fields, None)
        key = json.loads(text[i:key_end])
        i = _skip_ws(text, key_end)
        if i >= len(text):
            return ObjectScan(fields, None)
        if text[i] != ":":
            return ObjectScan(fields, None, valid=False)
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            return ObjectScan(fields, None)
        end = json_value_end(text, i)
        fields[key] = (i, end)
        if end is None:
            return ObjectScan(fields, None)
        i = end


@dataclass
class PartialCall:
    name: str | None  # set once the name string is complete
    arguments: str  # raw JSON text of the arguments value seen so far
    arguments_complete: bool
    complete: bool  # the whole call object is closed


def partial_call(text: str, start: int, name_keys: tuple[str, ...], argument_keys: tuple[str, ...]) -> PartialCall | None:
    """Read a call object `{"name": ..., "arguments": {...}}` starting at text[start] (None if not one)."""
    scan = scan_object(text, start)
    if not scan.valid:
        return None
    name = None
    for key in name_keys:
        if key in scan.fields and scan.fields[key][1] is not None:
            s, e = scan.fields[key]
            value = json.loads(text[s:e]) if text[s] == '"' else None
            name = value if isinstance(value, str) else None
    args, args_done = "", False
    for key in argument_keys:
        if key in scan.fields:
            s, e = scan.fields[key]
            args, args_done = (text[s:] if e is None else text[s:e]), e is not None
            if text[s] == '"':  # arguments given as a JSON-encoded string: only usable once complete
                args = json.loads(args) if args_done else ""
            break
    if scan.end is not None and not args_done:  # a call without arguments means "no arguments"
        args, args_done = "{}", True
    return PartialCall(name, args, args_done, scan.end is not None)


# ---------------------------------------------------------------- parser base
@dataclass
class SplitText:
    """A model output split into plain content and the starts of its call objects."""

    content: str  # content safe to show now (excludes a possible half-written call marker)
    call_starts: list[int]  # index of each call object's '{' in the text
    in_tool_mode: bool


class ToolParser:
    """Base: subclasses implement `split(text, final)`; the JSON reading and streaming diff are shared."""

    name_keys: tuple[str, ...] = ("name",)
    argument_keys: tuple[str, ...] = ("arguments", "parameters")
    # Hint for the server: the call markers are special tokens that must survive detokenization.
    needs_special_tokens = False

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        self._sent_content = 0
        self._sent: list[dict] = []  # per streamed call: {"id", "args_sent"}

    def split(self, text: str, final: bool) -> SplitText:
        raise NotImplementedError

    def read_call(self, text: str, start: int) -> PartialCall | None:
        """The call whose text starts at text[start], as far as it goes (JSON objects by default)."""
        return partial_call(text, start, self.name_keys, self.argument_keys)

    # -------- non-streaming
    def extract_tool_calls(self, text: str) -> tuple[str | None, list[dict]]:
        """(content or None, OpenAI tool_calls); unparseable call text falls back to plain content."""
        parts = self.split(text, final=True)
        calls = []
        for start in parts.call_starts:
            call = self.read_call(text, start)
            if call is None or call.name is None or not call.arguments_complete:
                continue
            try:
                arguments = json.loads(call.arguments) if call.arguments.strip() else {}
            except json.JSONDecodeError:
                continue
            calls.append(make_tool_call(call.name, arguments))
        if not calls:
            return text, []
        return (parts.content if parts.content.strip() else None), calls

    # -------- streaming
    @property
    def streamed_tool_calls(self) -> int:
        """How many calls were started in the stream (non-zero → finish_reason "tool_calls")."""
        return len(self._sent)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str) -> dict | None:
        return self._stream_diff(current_text, final=False)

    def finish_streaming(self, current_text: str) -> dict | None:
        """Flush at the end of the stream: held-back content, or the whole text if no call parsed."""
        delta = self._stream_diff(current_text, final=True)
        if not self._sent and self._sent_content < len(current_text):
            rest = current_text[self._sent_content:]
            self._sent_content = len(current_text)
            delta = delta or {}
            delta["content"] = delta.get("content", "") + rest
        return delta

    def _stream_diff(self, text: str, final: bool) -> dict | None:
        parts = self.split(text, final)
        delta: dict[str, Any] = {}
        if len(parts.content) > self._sent_content:
            delta["content"] = parts.content[self._sent_content:]
            self._sent_content = len(parts.content)
        tool_deltas = []
        for index, start in enumerate(parts.call_starts):
            call = self.read_call(text, start)
            if call is None or call.name is None:
                break  # later calls must wait for this one's name, to keep indices in order
            if index == len(self._sent):
                self._sent.append({"id": new_tool_call_id(), "args_sent": 0})
                tool_deltas.append({"index": index, "id": self._sent[index]["id"], "type": "function",
                                    "function": {"name": call.name, "arguments": ""}})
            sent = self._sent[index]
            if len(call.arguments) > sent["args_sent"]:
                fragment = call.arguments[sent["args_sent"]:]
                sent["args_sent"] = len(call.arguments)
                if tool_deltas and tool_deltas[-1]["index"] == index:
                    tool_deltas[-1]["function"]["arguments"] += fragment
                else:
                    tool_deltas.append({"index": index, "function": {"arguments": fragment}})
        if tool_deltas:
            delta["tool_calls"] = tool_deltas
        return delta or None


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (may become the marker)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _object_sequence(text: str, i: int, separators: str) -> list[int]:
    """Starts of consecutive objects from text[i], separated by whitespace/`separators`."""
    starts = []
    while True:
        while i < len(text) and (text[i] in _WS or text[i] in separators):
            i += 1
        if i >= len(text) or text[i] != "{":
            return starts
        starts.append(i)
        end = json_value_end(text, i)
        if end is None:
            return starts
        i = end


# ---------------------------------------------------------------- concrete parsers
class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5)."""

    start_marker, end_marker = "<tool_call>", "</tool_call>"
    needs_special_tokens = True

    def split(self, text: str, final: bool) -> SplitText:
        first = text.find(self.start_marker)
        if first < 0:
            keep = len(text) if final else len(text) - _held_back(text, self.start_marker)
            return SplitText(text[:keep], [], False)
        starts, i = [], first
        while i >= 0:
            body = _skip_ws(text, i + len(self.start_marker))
            if body < len(text) and text[body] == "{":
                starts.append(body)
            close = text.find(self.end_marker, body)
            if close < 0:
                break
            i = text.find(self.start_marker, close)
        return SplitText(text[:first], starts, True)


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`,
    several separated by `;`. Output that does not start with a call is plain content."""

    python_tag = "<|python_tag|>"
    argument_keys = ("parameters", "arguments")

    def split(self, text: str, final: bool) -> SplitText:
        i = _skip_ws(text, 0)
        if text.startswith(self.python_tag, i):
            i = _skip_ws(text, i + len(self.python_tag))
        elif not final and self.python_tag.startswith(text[i:]):
            return SplitText("", [], False)  # nothing yet, or a half-written python tag
        if i >= len(text):
            return SplitText("" if not final else text, [], False)
        if text[i] != "{":
            return SplitText(text, [], False)
        starts = _object_sequence(text, i, ";")
        first = self.read_call(text, starts[0])
        if first is None or (first.complete and first.name is None):
            return SplitText(text, [], False)  # JSON, but not a tool call
        return SplitText("", starts, True)


class MistralToolParser(ToolParser):
    """`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (Mistral v0.3 style)."""

    marker = "[TOOL_CALLS]"
    needs_special_tokens = True

    def split(self, text: str, final: bool) -> SplitText:
        first = text.find(self.marker)
        if first < 0:
            keep = len(text) if final else len(text) - _held_back(text, self.marker)
            return SplitText(text[:keep], [], False)
        i = _skip_ws(text, first + len(self.marker))
        if i < len(text) and text[i] == "[":
            i += 1
        return SplitText(text[:first], _object_sequence(text, i, ","), True)


class JsonArrayToolParser(ToolParser):
    """A bare JSON array of `{"name", "parameters"}` objects: the output of guided `tool_choice="required"`."""

    argument_keys = ("parameters", "arguments")

    def split(self, text: str, final: bool) -> SplitText:
        i = _skip_ws(text, 0)
        if i < len(text) and text[i] == "[":
            return SplitText("", _object_sequence(text, i + 1, ","), True)
        return SplitText("" if not final else text, [], False)


class PythonicToolParser(ToolParser):
    """Python call lists: `[get_weather(city="Oslo"), add(a=1, b=2)]` (Llama 3.2 / 4 style), optionally
    wrapped in `<|python_start|>`/`<|python_end|>`. A call's arguments are sent whole once it closes."""

    start_marker = "<|python_start|>"

    def split(self, text: str, final: bool) -> SplitText:
        i = _skip_ws(text, 0)
        if text.startswith(self.start_marker, i):
            i = _skip_ws(text, i + len(self.start_marker))
        elif not final and self.start_marker.startswith(text[i:]):
            return SplitText("", [], False)
        if i >= len(text):
            return SplitText("" if not final else text, [], False)
        if text[i] != "[":
            return SplitText(text, [], False)
        head = re.match(r"\[\s*([A-Za-z_][\w.]*)?(\s*\()?", text[i:])
        if not head.group(2):  # not (yet) `[name(`
            undecided = not final and head.end() == len(text) - i
            return SplitText("" if undecided else text, [], False)
        return SplitText("", _python_call_starts(text, i + 1), True)

    def read_call(self, text: str, start: int) -> PartialCall | None:
        name_match = re.match(r"([A-Za-z_][\w.]*)\s*\(", text[start:])
        if name_match is None:
            return None
        end = _python_expr_end(text, start)
        if end is None:
            return PartialCall(name_match.group(1), "", False, False)
        try:
            call = ast.parse(text[start:end].strip(), mode="eval").body
            if not isinstance(call, ast.Call) or call.args:
                return None
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            return PartialCall(name_match.group(1), json.dumps(arguments, ensure_ascii=False), True, True)
        except (SyntaxError, ValueError, TypeError):
            return None


def _python_expr_end(text: str, i: int) -> int | None:
    """End of the Python expression from text[i] up to a depth-0 ',' or ']' (None if unfinished)."""
    depth, quote = 0, None
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return i
            depth -= 1
        elif c == "," and depth == 0:
            return i
        i += 1
    return None


def _python_call_starts(text: str, i: int) -> list[int]:
    starts = []
    while True:
        i = _skip_ws(text, i)
        if i >= len(text) or text[i] == "]":
            return starts
        starts.append(i)
        end = _python_expr_end(text, i)
        if end is None or text[end] == "]":
            return starts
        i = end + 1


TOOL_PARSERS: dict[str, Callable[[Any], ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}


def get_tool_parser(name: str, tokenizer: Any = None) -> ToolParser:
    """A fresh parser for one request, by its `--tool-call-parser` name."""
    try:
        return TOOL_PARSERS[name](tokenizer)
    except KeyError:
        raise ValueError(f"Unknown tool call parser '{name}'; choose from: {', '.join(sorted(TOOL_PARSERS))}") \
            from None
