"""The deterministic fake model behind the ``fake`` provider and the fake LLM server: pure functions.

A text reply names how many earlier messages the model saw (``[k earlier]``), so a test can tell
that history arrived; the rest is chosen by a hash of the prompt, so equal prompts get equal replies.

Tool calling is driven by markers ``@name {json arguments}`` in the latest user message: for each
marker naming an offered tool the model calls that tool, all of them in one turn. Given the results
it answers with each result's content verbatim (``[k earlier] name returned: content``), unless a
result holds a marker of its own: then it calls that tool next, so a test can build loops of any
length (a tool returning ``@loop {}`` loops forever). A marker with bad JSON, or naming a tool not
offered, is plain text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Sequence
from typing import Any

import msgspec

from agentpool.shared.messages import Message, ToolCall

WORDS = [
    "agent",
    "pool",
    "warm",
    "stream",
    "token",
    "reply",
    "queue",
    "thread",
    "sticky",
    "replica",
    "broker",
    "redis",
    "rabbit",
    "answer",
    "helpful",
    "quick",
    "steady",
    "calm",
    "bright",
    "clear",
    "ready",
    "fast",
    "kind",
]
MARKER = re.compile(r"@([A-Za-z_][A-Za-z0-9_.-]*)\s*")
TOKEN = re.compile(r"\S+\s*|\s+")
CALL_ID_PREFIX = "call_"
_JSON = json.JSONDecoder()
_HASHED = msgspec.msgpack.Encoder()  # the conversation, as the input of tool call ids


class FakeAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What the fake model answers: text ``tokens`` or ``tool_calls``, never both."""

    tokens: list[str] = []
    tool_calls: list[ToolCall] = []
    truncated: bool = False  # max_tokens cut the text short

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def output_tokens(self) -> int:
        """Tokens for usage accounting: the text's, or one per tool call."""
        return len(self.tokens) if not self.tool_calls else max(1, len(self.tool_calls))


def count_tokens(text: str) -> int:
    """A rough, deterministic token count (whitespace words) for usage accounting."""
    return len(text.split())


def input_tokens(system: str, messages: Sequence[Message]) -> int:
    """The prompt's size for usage accounting: the system prompt and every message's content."""
    return count_tokens(system) + sum(count_tokens(m.content) for m in messages)


def fake_tokens(system: str, messages: Sequence[Message], n_tokens: int) -> list[str]:
    """The deterministic text reply to a prompt, as tokens (each ending in a space but the last)."""
    last = messages[-1].content if messages else ""
    return _text_tokens(system, messages, n_tokens, max(0, len(messages) - 1), last)


def _text_tokens(
    system: str, messages: Sequence[Message], n_tokens: int, earlier: int, last: str
) -> list[str]:
    seed = hashlib.blake2b(
        (system + "\x1f" + "\x1e".join(m.role + ":" + m.content for m in messages)).encode(),
        digest_size=32,
    ).digest()
    head = f"[{earlier} earlier] Re: {' '.join(last.split()[:4])[:40]} —".split()
    words = [WORDS[seed[i % len(seed)] % len(WORDS)] for i in range(max(0, n_tokens - len(head)))]
    toks = head + words
    return [t + " " for t in toks[:-1]] + [toks[-1]]


def markers(text: str, tool_names: Collection[str]) -> list[tuple[str, dict[str, Any]]]:
    """The ``@name {json}`` markers in ``text`` naming an offered tool, in order: (name, arguments)."""
    found: list[tuple[str, dict[str, Any]]] = []
    pos = 0
    while (m := MARKER.search(text, pos)) is not None:
        pos = m.end()
        if m.group(1) not in tool_names:
            continue
        try:
            arguments, end = _JSON.raw_decode(text, m.end())
        except json.JSONDecodeError:
            continue
        if isinstance(arguments, dict):
            found.append((m.group(1), arguments))
            pos = end  # a marker inside these arguments is part of them
    return found


def respond(
    system: str,
    messages: Sequence[Message],
    tool_names: Collection[str],
    n_tokens: int,
    max_tokens: int | None = None,
    *,
    id_prefix: str = CALL_ID_PREFIX,
) -> FakeAnswer:
    """The model's answer: tool calls for the markers it is owed, else text of ``n_tokens`` tokens
    (at most ``max_tokens``; an answer quoting tool results is as long as the results need).

    Owed: the markers of the latest user message if nothing answered it yet, or, once the latest
    round's results are in, the markers in those results (all of the round's, in order)."""
    user = _latest_user(messages)
    if user is None:
        return _plain(system, messages, n_tokens, max_tokens)
    after = messages[user + 1 :]
    if not after:
        calls = markers(messages[user].content, tool_names)
        if calls:
            return _calls(system, messages, calls, id_prefix)
        return _plain(system, messages, n_tokens, max_tokens)
    results = _latest_results(after)
    if not results:
        return _plain(system, messages, n_tokens, max_tokens, earlier=user)
    chained = [c for r in results for c in markers(r.content, tool_names)]
    if chained:
        return _calls(system, messages, chained, id_prefix)
    return _quoting(user, results, _names_by_id(after), max_tokens)


def _latest_user(messages: Sequence[Message]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)


def _latest_results(after: Sequence[Message]) -> list[Message]:
    """The tool messages that end the conversation, if they answer the latest assistant tool calls."""
    i = len(after)
    while i and after[i - 1].role == "tool":
        i -= 1
    if i == len(after) or not i or not after[i - 1].tool_calls:
        return []
    return list(after[i:])


def _names_by_id(messages: Sequence[Message]) -> dict[str, str]:
    return {c.id: c.name for m in messages for c in m.tool_calls}


def _plain(
    system: str,
    messages: Sequence[Message],
    n_tokens: int,
    max_tokens: int | None,
    earlier: int | None = None,
) -> FakeAnswer:
    n = min(n_tokens, max_tokens or n_tokens)
    if earlier is None:
        return FakeAnswer(tokens=fake_tokens(system, messages, n), truncated=n < n_tokens)
    last = messages[-1].content if messages else ""
    return FakeAnswer(tokens=_text_tokens(system, messages, n, earlier, last), truncated=n < n_tokens)


def _quoting(
    earlier: int, results: Sequence[Message], names: dict[str, str], max_tokens: int | None
) -> FakeAnswer:
    said = "; ".join(f"{r.name or names.get(r.tool_call_id, 'tool')} returned: {r.content}" for r in results)
    tokens = TOKEN.findall(f"[{earlier} earlier] {said}")
    if max_tokens and len(tokens) > max_tokens:
        return FakeAnswer(tokens=tokens[:max_tokens], truncated=True)
    return FakeAnswer(tokens=tokens)


def _calls(
    system: str, messages: Sequence[Message], calls: Sequence[tuple[str, dict[str, Any]]], id_prefix: str
) -> FakeAnswer:
    """Tool calls with ids derived from the conversation, so the same prompt gets the same ids."""
    base = hashlib.blake2b(system.encode() + b"\x1f" + _HASHED.encode(list(messages)), digest_size=16)
    out = []
    for i, (name, arguments) in enumerate(calls):
        h = base.copy()
        h.update(i.to_bytes(4, "big"))
        out.append(ToolCall(id=f"{id_prefix}{h.hexdigest()[:12]}", name=name, arguments=arguments))
    return FakeAnswer(tool_calls=out)
