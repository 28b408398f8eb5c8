"""The deploy files agree with the code: commands parse, pools exist, queue names match.

No Docker engine or cluster runs here, so these check what can go stale without one: every
``agentpool`` command in docker-compose.yml and the Kubernetes manifests is accepted by the real
argument parsers (``fake-llm --port`` once was not), the pools and deployments they name exist in
the pools file they are given, and KEDA's queue pattern matches the queues workers consume.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentpool.cli import _parser as agentpool_parser
from agentpool.fake_llm import _parser as fake_llm_parser
from agentpool.shared.config import Config, load_config, parse_config
from agentpool.shared.names import Names, replica_id

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/k8s"


def parses(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; SystemExit (argparse) if it would be refused."""
    if argv[:1] == ["fake-llm"]:
        return fake_llm_parser().parse_args(argv[1:])
    return agentpool_parser().parse_args(argv)


def manifests() -> list[dict[str, Any]]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def k8s_pools() -> Config:
    (config_map,) = [
        d for d in manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "agentpool-pools"
    ]
    return parse_config(config_map["data"]["pools.toml"], "deploy/k8s/config.yaml")


def test_compose_services_run_commands_the_cli_accepts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    ours = {name: s for name, s in services.items() if s.get("build") == "."}
    assert {"gateway", "workers", "worker", "fake-llm"} <= set(ours)
    example = load_config(ROOT / "shared/pools.example.toml")  # what the image runs by default
    for name, service in ours.items():
        args = parses(service["command"])
        if getattr(args, "command", None) == "worker":  # (fake-llm's namespace has no command)
            pool = example.pools[args.pool]
            assert args.deployment in {d.name for d in pool.deployments}, name
        for dep in service.get("depends_on", {}):
            assert dep in services, (name, dep)
    for service in services.values():  # mounted config files are in the repo
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume


def test_kubernetes_containers_run_commands_the_cli_accepts() -> None:
    pools = k8s_pools()
    deployments = [d for d in manifests() if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"].split("-")[1] for d in deployments} >= {"gateway", "worker"}
    for d in deployments:
        for container in d["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("agentpool"):
                args = parses(container["args"])
                if getattr(args, "command", None) == "worker":
                    assert args.deployment in {x.name for x in pools.pools[args.pool].deployments}


@pytest.mark.parametrize("n", [1, 2, 17])
def test_keda_counts_the_queues_workers_consume(n: int) -> None:
    (scaled,) = [d for d in manifests() if d["kind"] == "ScaledObject"]
    pattern = re.compile(scaled["spec"]["triggers"][0]["metadata"]["queueName"])
    names = Names("ap")  # the default namespace, which the manifests use
    pools = k8s_pools()
    pool = "support"
    deployment = pools.pools[pool].deployments[0].name
    # Then the pool's shared queue and every replica queue match, and nothing else of the pool
    assert pattern.match(names.pool_queue(pool))
    assert pattern.match(names.replica_queue(replica_id(pool, deployment, n)))
    assert not pattern.match(names.parking_queue(pool))  # parked requests are not work to scale on
    assert not pattern.match(names.replica_queue(replica_id("other", deployment, n)))


def _directives(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_every_shipped_redis_keeps_its_data_and_listens_only_where_asked() -> None:
    """Compose, scripts/services and the Kubernetes manifests all run deploy/redis/redis.conf (an
    append-only file, fsync every second); compose publishes each port on 127.0.0.1 only and takes
    the Redis and RabbitMQ credentials from the environment."""
    conf = _directives((ROOT / "deploy/redis/redis.conf").read_text())
    assert "appendonly yes" in conf and "appendfsync everysec" in conf
    (k8s_conf,) = [d for d in manifests() if d.get("metadata", {}).get("name") == "agentpool-redis-conf"]
    assert k8s_conf["data"]["redis.conf"].strip() == (ROOT / "deploy/redis/redis.conf").read_text().strip()
    (statefulset,) = [d for d in manifests() if d["kind"] == "StatefulSet"]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["args"][0] == "/etc/redis/redis.conf"
    assert "deploy/redis/redis.conf" in (ROOT / "scripts/services").read_text()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "./deploy/redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in services["redis"]["volumes"]
    assert services["redis"]["command"][:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert "--requirepass" in services["redis"]["command"]
    assert "AGENTPOOL_RABBITMQ_PASSWORD" in services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
