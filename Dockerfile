# One image for every agentpool role: gateway, workers (supervisor), a single worker, fake-llm.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY agentpool ./agentpool
COPY broker ./broker
COPY workers ./workers
COPY gateway ./gateway
COPY shared ./shared
COPY examples ./examples
RUN pip install --no-cache-dir . && useradd --system --uid 10001 agentpool
USER agentpool
ENV AGENTPOOL_AMQP_URL=amqp://guest:guest@rabbitmq:5672/ \
    AGENTPOOL_REDIS_URL=redis://redis:6379/0
ENTRYPOINT ["agentpool"]
CMD ["gateway"]
