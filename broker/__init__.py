"""RabbitMQ topology and publishing, Redis reply streams, replica registry, routing, and the
client that internal services and the gateway both use (:class:`agentpool.broker.client.AgentPoolClient`).
"""
