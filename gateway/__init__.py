"""The HTTP gateway: a thin ASGI shell over :class:`broker.client.AgentPoolClient`."""
