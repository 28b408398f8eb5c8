"""A run's messages as the thread keeps them: the user message, each model turn's text and tool
calls, each tool result, and the final answer, built from what the run sent to its client.

Both agent kinds go through it, so the next turn sees the same history in every provider's
format whichever kind (or replica) answered before.
"""

from __future__ import annotations

from collections.abc import Iterable

from agentpool.shared.messages import Message, StepEvent, ToolCall, ToolResult


class Transcript:
    def __init__(self, messages: Iterable[Message] = ()) -> None:
        self.messages: list[Message] = list(messages)
        self._text: list[str] = []
        self._open_calls = False  # the last message is an assistant turn still taking tool calls

    def text(self, text: str) -> None:
        if text:
            self._text.append(text)

    def event(self, event: StepEvent) -> None:
        if isinstance(event, ToolCall):
            self._call(event)
        elif isinstance(event, ToolResult):
            self.messages.append(
                Message(
                    "tool", event.content, tool_call_id=event.id, name=event.name, is_error=event.is_error
                )
            )
            self._open_calls = False

    def _call(self, call: ToolCall) -> None:
        plain = ToolCall(id=call.id, name=call.name, arguments=call.arguments)
        if self._open_calls and not self._text:
            self.messages[-1].tool_calls.append(plain)
            return
        self.messages.append(Message("assistant", self._flush(), tool_calls=[plain]))
        self._open_calls = True

    def _flush(self) -> str:
        text = "".join(self._text)
        self._text.clear()
        return text

    def close(self, request_id: str, awaiting_calls: bool = False) -> list[Message]:
        """The messages, ending with the final assistant text; each marked with ``request_id``.

        ``awaiting_calls``: the run ended on tool calls the caller runs (their results come with
        its next request), so it ends with those calls, not with an empty answer."""
        if awaiting_calls and not self._text:
            pass
        elif self._text or not self.messages or self.messages[-1].role != "assistant" or self._open_calls:
            self.messages.append(Message("assistant", self._flush()))
        for m in self.messages:
            m.request_id = request_id
        return self.messages


def clean_history(messages: list[Message]) -> list[Message]:
    """History a model API accepts: it starts at a user message (a window of the thread may cut a
    tool exchange in two), and every tool call has its result and every result its call."""
    text_only = not any(m.tool_calls or m.role == "tool" for m in messages)
    if text_only and (not messages or messages[0].role == "user"):
        return messages  # the common case
    start = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    messages = messages[start:]
    answered = {m.tool_call_id for m in messages if m.role == "tool"}
    asked: set[str] = set()
    out: list[Message] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = [c for c in m.tool_calls if c.id in answered]
            asked.update(c.id for c in calls)
            if not calls and not m.content:
                continue
            m = Message("assistant", m.content, m.request_id, tool_calls=calls)
        elif m.role == "tool" and m.tool_call_id not in asked:
            continue
        out.append(m)
    return out


def split_new(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """A caller's conversation as (earlier, new): new is what follows its last assistant message
    (the user message, or the results of the caller's tool calls) that this request answers."""
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "assistant"), -1)
    return messages[: last + 1], messages[last + 1 :]
