"""API keys and tenants: 401/403/404 cases, the open-mode rule, thread isolation, key hygiene."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from agentpool.gateway.keys import sha256_hex
from agentpool.shared.errors import ConfigError
from agentpool.shared.settings import Settings
from tests.api_helpers import h, make_key, store, tenant_config
from tests.conftest import PYTHON, System, running_gateway, subprocess_env

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """These tests run the gateway as `agentpool gateway` does by default: a key is required."""
    return replace(settings, auth="required")


async def test_missing_bad_and_revoked_keys_get_401(make_system) -> None:
    system: System = await make_system(config=tenant_config())
    key_id, key = await make_key(system, "ta", "ask")
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        ask = {"content": "hi"}
        assert (await http.post("/v1/ask/pa", json=ask, headers=h(key))).status_code == 200
        bearer = await http.post("/v1/ask/pa", json=ask, headers={"Authorization": f"Bearer {key}"})
        assert bearer.status_code == 200
        wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        for headers in (
            {},
            h("nope"),
            h(""),
            h(wrong_secret),
            h("ap_0123456789abcdef_" + "x" * 43),
            {"Authorization": "Bearer"},
            {"Authorization": "Basic eDp5"},
            h("k" * 5000),
            {**h(key), "Authorization": "Basic eDp5"},
            {**h(key), "Authorization": "Bearer other"},
        ):
            r = await http.post("/v1/ask/pa", json=ask, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error_code"] == "INVALID_API_KEY" and set(r.json()) == {
                "error",
                "error_code",
                "details",
            }
        await store(system).revoke(key_id)
        revoked = await http.post("/v1/ask/pa", json=ask, headers=h(key))
        assert revoked.status_code == 401 and revoked.json()["error_code"] == "INVALID_API_KEY"
        assert (await http.get("/v1/requests/abc", headers=h(key))).status_code == 401


async def test_other_tenants_pool_thread_and_request_look_missing(make_system) -> None:
    system: System = await make_system(config=tenant_config())
    _, ka = await make_key(system, "ta", "ask")
    _, kb = await make_key(system, "tb", "ask")
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        # Given a request of tenant A
        mine = await http.post("/v1/ask/pa", json={"content": "secret", "thread_id": "t-1"}, headers=h(ka))
        assert mine.status_code == 200
        rid = mine.json()["request_id"]
        # Then tenant B cannot use A's pool: the answer is the one for a pool that does not exist
        theirs = await http.post("/v1/ask/pa", json={"content": "x", "thread_id": "t-1"}, headers=h(kb))
        absent = await http.post("/v1/ask/nope", json={"content": "x"}, headers=h(kb))
        assert theirs.status_code == absent.status_code == 404
        assert theirs.json()["error_code"] == absent.json()["error_code"] == "POOL_NOT_FOUND"
        # nor read A's request, as JSON or as a stream: exactly like an unknown id
        for accept in ("application/json", "text/event-stream"):
            r = await http.get(f"/v1/requests/{rid}", headers={**h(kb), "Accept": accept})
            unknown = await http.get(f"/v1/requests/{'0' * 32}", headers={**h(kb), "Accept": accept})
            assert r.status_code == unknown.status_code == 404
            assert r.json()["error_code"] == unknown.json()["error_code"] == "REQUEST_NOT_FOUND"
        assert (await http.get(f"/v1/requests/{rid}", headers=h(ka))).json()["content"] == mine.json()[
            "content"
        ]


async def test_same_thread_id_in_two_tenants_never_shares_history(make_system) -> None:
    system: System = await make_system(config=tenant_config())
    _, ka = await make_key(system, "ta", "ask")
    _, kb = await make_key(system, "tb", "ask")
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for i in range(2):
            r = await http.post("/v1/ask/pa", json={"content": f"a{i}", "thread_id": "shared"}, headers=h(ka))
            assert r.json()["content"].startswith(f"[{2 * i} earlier]")
        other = await http.post("/v1/ask/pb", json={"content": "b", "thread_id": "shared"}, headers=h(kb))
        assert other.json()["content"].startswith("[0 earlier]"), "tenant B saw tenant A's history"
        names, redis = system.client.names, system.client.redis
        assert await redis.llen(names.thread("ta", "shared")) == 4
        assert await redis.llen(names.thread("tb", "shared")) == 2
        # generated thread ids are uuid4 hex: 122 random bits, not guessable
        generated = (await http.post("/v1/ask/pa", json={"content": "new"}, headers=h(ka))).json()[
            "thread_id"
        ]
        assert re.fullmatch(r"[0-9a-f]{32}", generated) and generated[12] == "4"


async def test_admin_endpoints_need_the_admin_scope(make_system) -> None:
    system: System = await make_system(config=tenant_config())
    _, ask_only = await make_key(system, "ta", "ask")
    admin_id, admin = await make_key(system, "ta", "admin")
    b_id, _ = await make_key(system, "tb", "ask", "admin")
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for method, path in (
            ("GET", "/v1/keys"),
            ("GET", "/v1/webhooks/secret"),
            ("DELETE", f"/v1/keys/{b_id}"),
        ):
            r = await http.request(method, path, headers=h(ask_only))
            assert r.status_code == 403 and r.json()["error_code"] == "FORBIDDEN", (path, r.text)
        # an admin-only key cannot ask
        assert (await http.post("/v1/ask/pa", json={"content": "x"}, headers=h(admin))).status_code == 403
        listed = await http.get("/v1/keys", headers=h(admin))
        assert listed.status_code == 200
        assert {k["tenant"] for k in listed.json()["keys"]} == {"ta"} and len(listed.json()["keys"]) == 2
        assert admin not in listed.text and sha256_hex(admin) not in listed.text
        # another tenant's key is not found, not revoked
        assert (await http.delete(f"/v1/keys/{b_id}", headers=h(admin))).status_code == 404
        assert await store(system).get(b_id) is not None
        assert (await http.delete(f"/v1/keys/{admin_id}", headers=h(admin))).json() == {
            "id": admin_id,
            "revoked": True,
        }
        assert (await http.get("/v1/keys", headers=h(admin))).status_code == 401


ANONYMOUS_CALLS = [  # an ask, an admin read, an admin write
    ("POST", "/v1/ask/p", {"content": "hi"}),
    ("GET", "/v1/keys", None),
    ("PUT", "/v1/pools/p/deployments/main", {"replicas": 0}),
]


async def test_auth_is_required_unless_open_is_asked_for(make_system) -> None:
    """`required` is the default and nothing in Redis changes it; only AGENTPOOL_AUTH=open lets callers in
    without a key, and a key that is sent is checked in both modes."""
    assert Settings().auth == "required" and Settings.from_env({}).auth == "required"
    with pytest.raises(ConfigError, match="'auto' is gone"):
        Settings.from_env({"AGENTPOOL_AUTH": "auto"})
    system: System = await make_system(replicas=1)
    settings, config = system.settings, system.config
    # Given no key was ever created here: still required, for ask and for admin
    async with running_gateway(settings, config) as url, httpx.AsyncClient(base_url=url) as http:
        for method, path, body in ANONYMOUS_CALLS:
            r = await http.request(method, path, json=body)
            assert r.status_code == 401 and r.json()["error_code"] == "INVALID_API_KEY", (path, r.text)
            assert "agentpool keys create" in r.json()["error"]
    # Open: a caller without a key is tenant default with every scope; a bad key is still refused
    async with (
        running_gateway(replace(settings, auth="open"), config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (await http.post("/v1/ask/p", json={"content": "hi"})).status_code == 200
        assert (await http.get("/v1/keys")).status_code == 200
        assert (await http.post("/v1/ask/p", json={"content": "hi"}, headers=h("bad"))).status_code == 401


async def test_after_redis_loses_everything_anonymous_calls_are_refused(make_system) -> None:
    """A key made before Redis lost its data is refused afterwards (401), and no caller is let in
    without one: the loss can only close doors (ask and admin alike)."""
    system: System = await make_system(replicas=1, start=False)
    settings, config = system.settings, system.config
    _key_id, key = await make_key(system, "acme", "ask", "admin")
    redis = system.client.redis
    wiped = [k async for k in redis.scan_iter(match=system.client.names.pattern())]
    await redis.delete(*wiped)  # every Redis key of the namespace gone, as after a wipe
    async with running_gateway(settings, config) as url, httpx.AsyncClient(base_url=url) as http:
        for headers in ({}, h(key)):
            for method, path, body in ANONYMOUS_CALLS:
                r = await http.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (headers, path, r.text)


async def test_keys_from_the_pools_file(make_system, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_BOOT_KEY", "boot-key-from-env-0123456789")
    hashed = sha256_hex("another-boot-key-9876543210")
    extra = f"""
[[api_keys]]
tenant = "ta"
scopes = ["ask", "admin"]
key_env = "TEST_BOOT_KEY"

[[api_keys]]
id = "ops"
tenant = "tb"
key_sha256 = "{hashed}"
"""
    system: System = await make_system(config=tenant_config(extra=extra))
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (
            await http.post("/v1/ask/pa", json={"content": "x"})
        ).status_code == 401  # a config key: required
        ok = await http.post("/v1/ask/pa", json={"content": "x"}, headers=h("boot-key-from-env-0123456789"))
        assert ok.status_code == 200
        assert (
            await http.post("/v1/ask/pb", json={"content": "x"}, headers=h("another-boot-key-9876543210"))
        ).status_code == 200
        keys = (await http.get("/v1/keys", headers=h("boot-key-from-env-0123456789"))).json()["keys"]
        assert [(k["id"], k["source"]) for k in keys] == [("config-0", "config")]


def test_a_plain_key_in_the_pools_file_is_refused() -> None:
    from agentpool.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one of key_sha256 or key_env"):
        tenant_config(extra='[[api_keys]]\ntenant = "ta"\n')
    with pytest.raises(ConfigError, match="key"):
        tenant_config(extra='[[api_keys]]\ntenant = "ta"\nkey = "plain"\n')


async def test_keys_never_appear_in_logs_or_metrics(make_system, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    system: System = await make_system(config=tenant_config())
    key_id, key = await make_key(system, "ta", "ask", "admin")
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        typo = key[:-1] + ("x" if key[-1] != "x" else "y")
        for k in (key, typo, "Bearer " + key):
            for path in ("/v1/ask/pa", "/v1/ask/pb", "/v1/ask/nope"):
                await http.post(path, json={"content": "log me"}, headers=h(k))
            await http.post("/v1/ask/pa", content=b"{broken", headers=h(k))
            await http.get("/v1/keys", headers={"Authorization": f"Bearer {k}"})
        metrics = await http.get("/metrics")
        await store(system).revoke(key_id)
        revoked = await http.post("/v1/ask/pa", json={"content": "x"}, headers=h(key))
    secret = key.split("_", 2)[2]
    for text in (caplog.text, metrics.text, revoked.text):
        assert secret not in text and typo.split("_", 2)[2] not in text and sha256_hex(key) not in text


async def _cli(settings, config_path: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "agentpool",
        "keys",
        *args,
        env=subprocess_env(settings, config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_creates_lists_and_revokes_keys(make_system, tmp_path: Path) -> None:
    system: System = await make_system(config=tenant_config())
    cfg = tmp_path / "pools.toml"
    cfg.write_text((Path(__file__).parents[1] / "shared" / "pools.example.toml").read_text())
    code, out, _ = await _cli(
        system.settings, cfg, "create", "--tenant", "ta", "--scope", "ask", "--scope", "admin"
    )
    assert code == 0, out
    key = out.strip().splitlines()[-1]
    key_id = re.search(r"created key (\S+)", out).group(1)  # type: ignore[union-attr]
    assert key.startswith(f"ap_{key_id}_")
    found = await store(system).get(key_id)
    assert found is not None and found[1].scopes == ["admin", "ask"] and found[0] == sha256_hex(key)
    code, listed, _ = await _cli(system.settings, cfg, "list")
    assert code == 0 and key_id in listed and key not in listed and found[0] not in listed
    assert (await _cli(system.settings, cfg, "revoke", key_id))[0] == 0
    assert await store(system).get(key_id) is None
    assert (await _cli(system.settings, cfg, "revoke", key_id))[0] == 2
    assert (await _cli(system.settings, cfg, "create", "--tenant", "Bad:Tenant"))[0] == 2
