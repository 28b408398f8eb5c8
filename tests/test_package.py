"""The distribution installs one top-level package, ``agentpool``, with a public API at its top.

The repository's ``broker/``, ``workers/``, ``gateway/`` and ``shared/`` install as
``agentpool.broker`` etc.: a user's own module named ``shared`` (or ``workers``...) is never
shadowed, and nothing in agentpool imports those names at the top level.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import agentpool

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
INTERNAL = ("broker", "workers", "gateway", "shared")


def _top_level_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in INTERNAL]
    return found


def test_no_code_imports_the_source_folders_as_top_level_packages() -> None:
    files = [
        p for d in (*INTERNAL, "agentpool", "tests", "bench", "examples") for p in (ROOT / d).rglob("*.py")
    ]
    assert len(files) > 100
    offenders = [hit for p in files if not p.is_symlink() for hit in _top_level_imports(p)]
    assert offenders == []


def test_a_users_own_shared_module_is_not_shadowed(tmp_path: Path) -> None:
    (tmp_path / "shared.py").write_text("MINE = True\n", encoding="utf-8")
    (tmp_path / "workers.py").write_text("MINE = True\n", encoding="utf-8")
    code = (
        "import importlib.util, shared, workers\n"
        "from agentpool import AgentPoolClient\n"
        "import agentpool.workers.runtime, agentpool.gateway.app\n"
        "assert shared.MINE and workers.MINE, 'shadowed'\n"
        "assert importlib.util.find_spec('broker') is None and importlib.util.find_spec('gateway') is None\n"
        "print(AgentPoolClient.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "agentpool.broker.client"


def test_the_public_api_names_resolve() -> None:
    assert agentpool.__all__ == sorted(agentpool.__all__)
    for name in agentpool.__all__:
        assert getattr(agentpool, name) is not None, name
    from agentpool import AgentPoolClient, End, ErrorEvent, Interrupted

    assert AgentPoolClient.__module__ == "agentpool.broker.client"
    assert (End.__struct_config__.tag, ErrorEvent.__struct_config__.tag) == ("end", "error")
    assert issubclass(Interrupted, agentpool.AgentPoolError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        agentpool.nope  # noqa: B018
