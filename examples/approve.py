import asyncio

from agentpool import AgentPoolClient, Interrupted


async def main() -> None:
    async with AgentPoolClient.from_env() as client:
        order = '@refund_order {"order_id": "A1002", "amount_cents": 500}'
        try:
            reply = await client.ask("support-mcp", f"Refund it. {order}", thread_id="desk-8")
        except Interrupted as paused:
            call = paused.interrupt.tool_call
            print("paused before", call.name, call.arguments)
            reply = await client.resume(paused.interrupt.request_id, approve=True)
        print(reply.content)


asyncio.run(main())
