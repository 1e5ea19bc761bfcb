"""A reasoning model's thinking split from its answer (vLLM's --reasoning-parser): `<think>…</think>`.

- deepseek_r1: the chat template opens the think block, so the output starts inside it: everything before
  `</think>` is reasoning (all of it while `</think>` has not come); a leading `<think>` is dropped.
- qwen3: only a `<think>…</think>` block is reasoning; an output without one is all content (the template
  writes an empty block into the prompt when thinking is off).

`split_reasoning` splits a whole output; `ReasoningStream` splits one as it streams, holding back a tag cut
between two deltas. Both return (reasoning, content), either None when empty.
"""
from __future__ import annotations

PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


def split_reasoning(parser: str, text: str) -> tuple[str | None, str | None]:
    if parser == "qwen3" and (START not in text or END not in text):
        return None, text or None
    before, tag, after = text.partition(START)
    body = after if tag else before
    if END not in body:
        return body or None, None
    reasoning, _, content = body.partition(END)
    return reasoning or None, content or None


def _held_back(text: str, tag: str) -> int:
    """How many of text's last characters could begin `tag` (wait for the next delta before sending them)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """One choice's output as it streams: `add(delta, final)` returns the delta's (reasoning, content)."""

    def __init__(self, parser: str):
        self.state = "reasoning" if parser == "deepseek_r1" else "before"  # before: not yet known (qwen3)
        self.pending = ""
        self.started = False  # any reasoning sent (a leading <think> is dropped only before it)

    def add(self, delta: str, final: bool = False) -> tuple[str | None, str | None]:
        self.pending += delta
        reasoning, content = [], []
        while True:
            if self.state == "before":
                if self.pending.startswith(START):
                    self.pending, self.state = self.pending[len(START):], "reasoning"
                elif START.startswith(self.pending) and not final:
                    break  # could still become <think>
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if not self.started and self.pending.startswith(START):
                    self.pending = self.pending[len(START):]
                if not self.started and START.startswith(self.pending) and self.pending and not final:
                    break
                end = self.pending.find(END)
                if end >= 0:
                    reasoning.append(self.pending[:end])
                    self.pending, self.state = self.pending[end + len(END):], "content"
                    continue
                keep = 0 if final else _held_back(self.pending, END)
                reasoning.append(self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                self.started = self.started or bool(reasoning[-1])
                break
            else:
                content.append(self.pending)
                self.pending = ""
                break
        return "".join(reasoning) or None, "".join(content) or None
