"""The built-in tool loop: call the model, run the tools it asks for, feed the results back, repeat.

Several calls in one model turn run concurrently, each bounded by its timeout; a tool that fails
or times out gives the model an error result and the loop goes on. Past ``max_tool_rounds`` the
run fails with ``TOOL_ROUNDS_EXCEEDED``. A call to a tool that needs approval pauses the run
(:class:`NeedsApproval` carries the :class:`LoopState`, which the runtime stores); resuming it with
a decision continues from that state without repeating a model call already made.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import msgspec

from agentpool.shared.errors import AgentPoolError
from agentpool.shared.messages import Message, StepEvent, ToolCall, ToolChoice, ToolResult
from agentpool.workers.agents.llm import LLM
from agentpool.workers.providers.base import ToolSpec
from agentpool.workers.tools.base import Tool, ToolFailure


class Sink(Protocol):
    """Where a run's output goes, in order: text pieces and step events."""

    def text(self, text: str) -> None: ...

    def event(self, event: StepEvent) -> None: ...


class AgentFailed(AgentPoolError):
    """A run that cannot finish: its ``error_code`` ends the reply (TOOL_ROUNDS_EXCEEDED, AGENT_ERROR)."""

    status = 502
    error_code = "AGENT_ERROR"


class LoopState(msgspec.Struct, kw_only=True):
    """A paused round: the conversation up to the model's tool calls, the results so far, and the
    calls still waiting for a human (the first one is the one being asked about)."""

    messages: list[Message]
    calls: list[ToolCall]
    results: list[ToolResult] = []
    pending: list[ToolCall] = []
    round: int = 0
    client_calls: list[ToolCall] = []  # calls of the caller's own tools in this round: theirs to run


class NeedsApproval(Exception):
    def __init__(self, state: LoopState) -> None:
        super().__init__(f"tool call {state.pending[0].name!r} needs approval")
        self.state = state


class ClientToolCalls(Exception):
    """The model called tools the caller brought (``Chat.tools``): the run ends here and the
    caller runs them; its next request brings the results."""

    def __init__(self, calls: list[ToolCall]) -> None:
        super().__init__(f"the model called the caller's tools {[c.name for c in calls]}")
        self.calls = calls


class Decision(msgspec.Struct, kw_only=True):
    approve: bool
    reason: str = ""


class ToolBox:
    """An agent type's tools by name, how long each may take, and which need approval."""

    def __init__(
        self,
        tools: Sequence[Tool],
        *,
        timeout_s: float,
        approval: Iterable[str] = (),
        on_result: Callable[[ToolResult], None] | None = None,
        client: Sequence[ToolSpec] = (),
    ) -> None:
        self.tools = {t.name: t for t in tools}
        self.timeout_s = timeout_s
        self.approval = frozenset(approval)
        self.on_result = on_result
        self.client = frozenset(s.name for s in client)  # the caller's tools: offered, never run here
        self.specs: list[ToolSpec] = [t.spec for t in tools] + list(client)
        self._client_specs = list(client)

    def subset(self, tools: Sequence[Tool]) -> ToolBox:
        return ToolBox(
            tools,
            timeout_s=self.timeout_s,
            approval=self.approval,
            on_result=self.on_result,
            client=self._client_specs,
        )

    def with_client(self, specs: Sequence[ToolSpec]) -> ToolBox:
        """This box, also offering the caller's own tools (a name of the agent type's own is refused)."""
        if not specs:
            return self
        clash = sorted({s.name for s in specs} & set(self.tools))
        if clash:
            raise AgentFailed(
                f"the request's tools {clash} have the names of the agent type's own tools; rename them",
                error_code="TOOL_NAME_CONFLICT",
            )
        return ToolBox(
            list(self.tools.values()),
            timeout_s=self.timeout_s,
            approval=self.approval,
            on_result=self.on_result,
            client=specs,
        )

    async def run(self, call: ToolCall) -> ToolResult:
        """Run one call; every failure becomes an error result, never an exception (cancel aside)."""
        t0 = time.monotonic()
        content, code = await self._call(call)
        result = ToolResult(
            id=call.id,
            name=call.name,
            content=content,
            is_error=bool(code),
            error_code=code,
            duration_ms=round((time.monotonic() - t0) * 1000, 3),
        )
        if self.on_result is not None:
            self.on_result(result)
        return result

    async def _call(self, call: ToolCall) -> tuple[str, str]:
        tool = self.tools.get(call.name)
        if tool is None:
            offered = ", ".join(sorted(self.tools)) or "none"
            return f"no tool named {call.name!r} (offered: {offered})", "TOOL_NOT_FOUND"
        timeout_s = tool.timeout_s or self.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await tool.call(call.arguments), ""
        except TimeoutError:
            return f"tool {call.name!r} timed out after {timeout_s:g} s", "TOOL_TIMEOUT"
        except ToolFailure as e:
            return e.message, e.error_code

    async def run_all(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run calls concurrently; results in the order of the calls."""
        if len(calls) == 1:
            return [await self.run(calls[0])]
        return list(await asyncio.gather(*(self.run(c) for c in calls)))


def tool_messages(calls: Sequence[ToolCall], results: Sequence[ToolResult]) -> list[Message]:
    """The results as ``tool`` messages, in the order the model asked for the calls."""
    by_id = {r.id: r for r in results}
    return [
        Message("tool", r.content, tool_call_id=r.id, name=r.name, is_error=r.is_error)
        for r in (by_id[c.id] for c in calls if c.id in by_id)
    ]


async def tool_loop(
    llm: LLM,
    tools: ToolBox,
    sink: Sink,
    *,
    system: str,
    messages: list[Message],
    max_rounds: int,
    start_round: int = 0,
    tool_choice: ToolChoice | None = None,
) -> None:
    """Model call, tools, repeat until the model answers without a tool call (or calls one of the
    caller's own tools: :class:`ClientToolCalls`). ``tool_choice`` binds the first call; ``none``
    every call."""
    for round_ in itertools.count(start_round):
        choice = tool_choice if round_ == start_round or _never(tool_choice) else None
        reply = await llm.complete(
            messages, system=system, tools=tools.specs, on_text=sink.text, tool_choice=choice
        )
        if not reply.tool_calls:
            return
        if round_ >= max_rounds:
            raise AgentFailed(
                f"the model still asked for tools after {max_rounds} tool rounds (max_tool_rounds)",
                error_code="TOOL_ROUNDS_EXCEEDED",
            )
        calls = reply.tool_calls
        for call in calls:
            sink.event(call)
        messages.append(Message("assistant", reply.text, tool_calls=calls))
        theirs = [c for c in calls if c.name in tools.client]
        ours = [c for c in calls if c.name not in tools.client]
        pending = [c for c in ours if c.name in tools.approval]
        state = LoopState(messages=messages, calls=calls, pending=pending, round=round_, client_calls=theirs)
        state.results = await tools.run_all([c for c in ours if c.name not in tools.approval])
        for result in state.results:
            sink.event(result)
        if pending:
            raise NeedsApproval(state)
        if theirs:
            raise ClientToolCalls(theirs)
        messages.extend(tool_messages(calls, state.results))


def _never(choice: ToolChoice | None) -> bool:
    return choice is not None and choice.mode == "none"


async def resume_loop(
    llm: LLM,
    tools: ToolBox,
    sink: Sink,
    *,
    system: str,
    state: LoopState,
    decision: Decision,
    max_rounds: int,
) -> None:
    """Apply the decision to the call waiting for it, then go on where the loop paused."""
    call = state.pending.pop(0)
    if decision.approve:
        result = await tools.run(call)
    else:
        why = f": {decision.reason}" if decision.reason else ""
        result = ToolResult(
            id=call.id,
            name=call.name,
            content=f"A human denied this call to {call.name!r}{why}. Do not call it again for this request.",
            is_error=True,
            error_code="TOOL_DENIED",
        )
    sink.event(result)
    state.results.append(result)
    if state.pending:
        raise NeedsApproval(state)
    if state.client_calls:
        raise ClientToolCalls(state.client_calls)
    state.messages.extend(tool_messages(state.calls, state.results))
    await tool_loop(
        llm,
        tools,
        sink,
        system=system,
        messages=state.messages,
        max_rounds=max_rounds,
        start_round=state.round + 1,
    )
