"""agentpool: pools of warm LLM agents behind RabbitMQ and Redis.

The packages are ``shared`` <- ``broker`` <- ``workers``, ``gateway``; this one holds the
``agentpool`` command, which imports each subcommand's package when that subcommand runs, and the
fake LLM server (``agentpool fake-llm``), which needs ``shared`` only.
"""

__version__ = "0.1.0"
