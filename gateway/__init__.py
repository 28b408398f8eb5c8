"""The HTTP gateway: a thin ASGI shell over :class:`agentpool.broker.client.AgentPoolClient`."""
