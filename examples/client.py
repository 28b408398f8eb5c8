import asyncio

from agentpool import AgentPoolClient, Chunk, End


async def main() -> None:
    async with AgentPoolClient.from_env() as client:  # AGENTPOOL_* settings, see below
        reply = await client.ask("support", "Hi", thread_id="t-1")
        print(reply.agent_id, reply.usage, reply.content.split(" — ")[0])  # the fake model's gist
        async for event in client.stream("support", "And then?", thread_id="t-1"):
            if isinstance(event, Chunk):  # also Start, ToolCall, ToolResult, Step; End or Error last
                print("chunk", repr(event.text))
            elif isinstance(event, End):
                print("end", event.agent_id, event.content.split(" — ")[0])


asyncio.run(main())
