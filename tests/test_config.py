"""The pools file and settings fail loudly, naming the file, the field and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentpool.shared.config import EXAMPLE_CONFIG, load_config, parse_config
from agentpool.shared.errors import ConfigError
from agentpool.shared.settings import Settings
from tests.conftest import make_config

pytestmark = pytest.mark.timeout(10)

BASE = """
[providers.fake]
kind = "fake"
[agent_types.a]
provider = "fake"
[pools.p]
[[pools.p.deployments]]
name = "d"
agent_type = "a"
"""


def test_shipped_example_is_valid() -> None:
    config = load_config(EXAMPLE_CONFIG)
    assert config.pools["support"].deployments[0].replicas == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x = ", "not valid TOML"),
        (
            BASE.replace('name = "d"', "name = 3"),
            "Expected `str`, got `int` - at `pools.p.deployments[0].name`",
        ),
        (
            BASE.replace('provider = "fake"', 'provider = "nope"'),
            "agent_types.a.provider: unknown provider 'nope'",
        ),
        (
            BASE.replace('agent_type = "a"', 'agent_type = "zz"'),
            "pools.p.deployments[0].agent_type: unknown agent type 'zz'",
        ),
        (BASE + "[pools.p.limits]\nsticky_depth = 11\n", "pools.p.limits.sticky_depth: must be <= max_depth"),
        (BASE + "[pools.p.limits]\nconcurrency = 10\n", "pools.p.limits.concurrency: must be < max_depth"),
        (
            BASE + "[pools.p.limits]\nconcurrency = 0\n",
            "Expected `int` >= 1 - at `pools.p.limits.concurrency`",
        ),
        (BASE.replace("[pools.p]", "[pools.p]\ncolour = 1"), "unknown field `colour` - at `pools.p`"),
        (BASE.replace('kind = "fake"', 'kind = "llama"'), "at `providers.fake.kind`"),
        (
            BASE.replace("[pools.p]", "[pools.Bad_Name]").replace("pools.p.", "pools.Bad_Name."),
            "Expected `str` matching regex",
        ),
        (
            BASE.replace('name = "d"', 'name = "d"\nreplicas = -1'),
            "Expected `int` >= 0 - at `pools.p.deployments[0].replicas`",
        ),
    ],
)
def test_bad_config_names_file_field_and_problem(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "pools.toml")
    assert str(e.value).startswith("pools.toml: ")
    assert expected in str(e.value)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the pools file"):
        load_config(tmp_path / "nope.toml")


def test_settings_from_env_validate() -> None:
    s = Settings.from_env({"AGENTPOOL_AMQP_URL": "amqp://u:secret@h:5672/", "AGENTPOOL_NAMESPACE": "x1"})
    assert s.amqp_url == "amqp://u:secret@h:5672/" and s.namespace == "x1"
    with pytest.raises(ConfigError, match="AGENTPOOL_REDIS_URL"):
        Settings.from_env({"AGENTPOOL_REDIS_URL": "http://nope"})
    with pytest.raises(ConfigError, match="AGENTPOOL_NAMESPACE"):
        Settings.from_env({"AGENTPOOL_NAMESPACE": "Has Spaces"})


def test_test_config_factory_is_valid() -> None:
    assert make_config(replicas=2).pools["p"].deployments[0].replicas == 2
