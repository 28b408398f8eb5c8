"""README.md, run top to bottom as a new user would: every command as written, in order.

The commands run in one bash session from the repository root, against the real system they
start (``scripts/dev``, the examples' ``agentpool dev``, the fake LLM server) on the built-in fake
model, in a namespace of their own that is deleted afterwards. The only changes made to them:
the ports (8080, 9100, 9464 become free ones, through ``AGENTPOOL_PORT`` /
``AGENTPOOL_METRICS_PORT`` and in the command text), and the rules below, each with its reason.
Each command must exit 0, print no traceback, and print output of the shape the README shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import msgspec
import pytest

from agentpool.shared.config import Pool, load_config
from agentpool.shared.settings import Settings
from tests import readme_check
from tests.conftest import cleanup_namespace, free_port
from tests.readme_check import Failure, Rule, blocks, line_matches, mismatch, run_file

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGS = [
    "shared/pools.example.toml",
    "shared/pools.providers.example.toml",
    "examples/sql_agent/pools.toml",
    "examples/mcp_support/pools.toml",
]


def rules(port: int) -> list[Rule]:
    background = "runs in a terminal of its own until Ctrl-C"
    return [
        Rule("scripts/dev ", "background", background, port),
        Rule(
            "AGENTPOOL_CONFIG=examples/sql_agent/pools.toml .venv/bin/agentpool dev",
            "background",
            background,
            port,
        ),
        Rule(
            "AGENTPOOL_CONFIG=examples/mcp_support/pools.toml .venv/bin/agentpool dev",
            "background",
            background,
            port,
        ),
        Rule("scripts/test", "skip", "the command that runs this test"),
        Rule("export ANTHROPIC_API_KEY=sk-ant-...", "skip", "needs real API keys"),
        Rule(
            "AGENTPOOL_CONFIG=shared/pools.providers.example.toml scripts/dev", "skip", "needs real API keys"
        ),
        Rule(
            """curl -s localhost:8080/v1/ask/claude -d '{"content":"hello","context""",
            "skip",
            "needs real API keys",
        ),
        Rule(".venv/bin/python bench/", "skip", "a benchmark: minutes of load, run by hand"),
    ]


def example_rules(port: int) -> list[Rule]:
    background = "runs in a terminal of its own until Ctrl-C"
    return [
        Rule(
            f"AGENTPOOL_CONFIG=examples/{name}/pools.toml .venv/bin/agentpool dev",
            "background",
            background,
            port,
        )
        for name in ("sql_agent", "team", "mcp_support")
    ]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("readme", ["README.md", "examples/README.md"])
def test_every_readme_command_runs_as_written(settings: Settings, tmp_path: Path, readme: str) -> None:
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.skip("the README's commands need curl and jq (.ci/run installs them)")
    port, llm_port, metrics_port, api_port = free_port(), free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTPOOL_", "ANTHROPIC_", "OPENAI_", "PYTEST_", "COV_"))
    }
    # as on a fresh machine: no activated venv (the README writes .venv/bin/ where it needs it)
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and not d.startswith(str(ROOT / ".venv"))]
    env.pop("VIRTUAL_ENV", None)
    env |= {
        "PATH": os.pathsep.join(path),
        "AGENTPOOL_AMQP_URL": settings.amqp_url,
        "AGENTPOOL_REDIS_URL": settings.redis_url,
        "AGENTPOOL_NAMESPACE": settings.namespace,
        "AGENTPOOL_PORT": str(port),
        "AGENTPOOL_METRICS_PORT": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
    }
    report = readme_check.Report()
    try:
        run_file(
            ROOT / readme,
            cwd=ROOT,
            env=env,
            rules=rules(port) if readme == "README.md" else example_rules(port),
            substitutions={
                "8080": str(port),
                "9100": str(llm_port),
                "9464": str(metrics_port),
                "8901": str(api_port),
            },
            python=sys.executable,
            workdir=tmp_path,
            report=report,
        )
    finally:
        for path in CONFIGS:
            asyncio.run(cleanup_namespace(settings, load_config(ROOT / path)))
        served = load_config(ROOT / CONFIGS[0])  # what the README's config API served: one pool more
        served.pools["billing"] = msgspec.convert(
            {"deployments": [{"name": "main", "agent_type": "support"}]}, Pool
        )
        asyncio.run(cleanup_namespace(settings, served))
        if os.environ.get("AGENTPOOL_README_OUTPUTS"):  # to refresh the README's shown output by hand
            Path(os.environ["AGENTPOOL_README_OUTPUTS"]).write_text(
                "\n\n".join(f"### {what}\n{out}" for what, out in report.outputs), encoding="utf-8"
            )
    print(f"\n{readme}: {len(report.ran)} commands and blocks ran as written")
    for line in report.skipped:
        print("skipped", line)
    assert len(report.ran) >= (20 if readme == "README.md" else 10), report.ran
    assert not [
        s
        for s in report.skipped
        if "needs real API keys" not in s and "scripts/test" not in s and "bench/" not in s
    ]


def test_the_example_scripts_are_the_readme_blocks() -> None:
    bodies = {b.body.strip() for b in blocks(README.read_text(encoding="utf-8")) if b.lang == "python"}
    for script in ("examples/client.py", "examples/approve.py", "examples/openai_app.py"):
        assert (ROOT / script).read_text(encoding="utf-8").strip() in bodies, script


# --- the checker itself, on a deliberately broken README


BROKEN = """\
# a README with three mistakes

```console
$ echo '{"request_id": "ab12", "content": "hi"}'
{"request_id":"db3200cbd41a4ec1882e96fd792f81a3","content":"hello"}
$ agentpool-that-is-not-installed status
```
"""


def test_a_broken_readme_fails_on_the_command_that_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text(BROKEN, encoding="utf-8")
    env = {"PATH": os.environ["PATH"]}
    with pytest.raises(Failure, match=r"README.md:6: agentpool-that-is-not-installed status exited 127"):
        run_file(
            path, cwd=tmp_path, env=env, rules=[], substitutions={}, python=sys.executable, workdir=tmp_path
        )

    # an output of another shape, and a traceback, fail too
    path.write_text(BROKEN.replace('"content": "hi"', '"text": "hi"'), encoding="utf-8")
    with pytest.raises(Failure, match=r"README.md:4: .* no output line has the shape"):
        run_file(
            path, cwd=tmp_path, env=env, rules=[], substitutions={}, python=sys.executable, workdir=tmp_path
        )
    path.write_text("```python\nraise SystemExit(__import__('json').loads('{'))\n```\n", encoding="utf-8")
    with pytest.raises(Failure, match=r"README.md:1: the python block exited 1:\n.*Traceback"):
        run_file(
            path, cwd=tmp_path, env=env, rules=[], substitutions={}, python=sys.executable, workdir=tmp_path
        )


def test_shapes() -> None:
    # JSON: same keys (nested too), any values; `...` inside: the keys it names
    assert line_matches('{"a":1,"b":{"c":"x"}}', '{"a":2.5,"b":{"c":"y"}}')
    assert not line_matches('{"a":1,"b":{"c":"x"}}', '{"a":2,"b":{"d":"y"}}')
    assert line_matches('{"a":1, ...}', '{"a":3,"z":[]}')
    assert line_matches('data: {"t":"chunk"}', 'data: {"t":"end"}')
    assert not line_matches('data: {"t":"chunk"}', 'event: {"t":"end"}')
    # text: numbers, hex ids and spacing vary; words do not
    assert line_matches(
        "support-customer-support-1  ready   0      2.2s ago",
        "support-customer-support-3  ready  12  10.5s ago",
    )
    assert not line_matches("support-1  ready", "support-1  unhealthy")
    assert line_matches("key: ap_ed68…", "key: ap_0f3e_abcdef")
    assert line_matches("date: Thu, 03 Dec 2026 09:32:18 GMT", "date: Fri, 04 Jan 2027 18:47:49 GMT")
    assert not line_matches("status: Thu", "status: Thursday")
    assert mismatch(["a 1", "...", "c 3"], "a 2\nb\nc 4") is None
    assert mismatch(["c 3", "a 1"], "a 2\nc 4") is not None
    assert mismatch(["c 3", "a 1"], "a 2\nc 4", ordered=False) is None
    assert readme_check.Block  # the module's public names stay importable
