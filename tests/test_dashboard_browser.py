"""The dashboard (GET /ui) in a real headless Chromium: Debian's ``chromium``, driven by Playwright
with the system browser (it downloads none; `.ci/run` installs the package).

The page's Content-Security-Policy forbids eval, so the tests wait with Playwright's locators and
read the page with ``page.evaluate`` (a DevTools call, which the policy does not cover).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from agentpool.shared.config import load_config
from agentpool.shared.settings import Settings
from tests.api_helpers import make_key, tenant_config
from tests.conftest import System, cleanup_namespace, make_config, running_gateway
from tests.fleet_support import supervisors

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None  # type: ignore[assignment]

if async_playwright is not None:
    expect.set_options(timeout=30_000)  # agents start, scale and restart: seconds, not the 5 s default
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "shared" / "pools.example.toml"
SHOTS = ROOT / "tests" / "screenshots"  # the README shows these; every run takes them again

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        CHROMIUM is None or async_playwright is None,
        reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it) and playwright",
    ),
]


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        # root (CI, containers) cannot use Chromium's sandbox
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield b
        finally:
            await b.close()


async def open_page(browser: Browser, url: str, width: int = 1280) -> Page:
    context = await browser.new_context(viewport={"width": width, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(f"{url}/ui")
    return page


async def sign_in(page: Page, key: str) -> None:
    await page.get_by_label("API key", exact=True).fill(key)
    await page.get_by_role("button", name="Sign in").click()


def agents(page: Page, pool: str, status: str = "ready") -> Any:
    return page.locator(f'section[data-pool="{pool}"] tr[data-agent][data-status="{status}"]')


async def ready_pids(page: Page, pool: str) -> set[str]:
    return set(await agents(page, pool).evaluate_all("rows => rows.map(r => r.dataset.pid)"))


@pytest.fixture
def required(settings: Settings) -> Settings:
    return replace(settings, auth="required")


async def test_operator_signs_in_scales_restarts_and_asks(
    make_system, required: Settings, browser: Browser
) -> None:
    # Given the example pools file (pool support, 3 agents) run by a supervisor, keys required
    config = load_config(str(EXAMPLE))
    system: System = await make_system(config, start=False)
    _, admin = await make_key(system, "default", "ask", "admin")
    async with (
        supervisors(required, EXAMPLE, config),
        running_gateway(required, config) as url,
    ):
        page = await open_page(browser, url)
        # When the operator signs in with an admin key
        await expect(page.get_by_label("API key", exact=True)).to_be_visible()
        await sign_in(page, admin)
        # Then the example pool's 3 agents show up, live
        await expect(agents(page, "support")).to_have_count(3)
        assert admin not in page.url
        assert await page.evaluate("sessionStorage.getItem('agentpool.key')") == admin
        assert await page.evaluate("localStorage.length") == 0
        await page.evaluate("window.__sameDocument = true")  # gone if the page reloads

        # When it asks for more agents than a deployment may have, the API's refusal is shown
        await page.get_by_label("Desired agents of support / customer-support").fill("65")
        await page.get_by_role("button", name="Scale support / customer-support").click()
        await expect(page.get_by_role("alert")).to_contain_text("VALIDATION_ERROR")

        # When it scales the deployment to 5
        await page.get_by_label("Desired agents of support / customer-support").fill("5")
        await page.get_by_role("button", name="Scale support / customer-support").click()
        # Then 5 agents become ready without a reload
        await expect(agents(page, "support")).to_have_count(5, timeout=60_000)
        await expect(page.locator('section[data-pool="support"] td.ready')).to_have_text(
            re.compile(r"^5 / 5")
        )
        assert await page.evaluate("window.__sameDocument") is True
        before = await ready_pids(page, "support")
        assert len(before) == 5
        await expect(page.locator("#total-agents")).to_have_text("5 / 5")
        # (some traffic, so that the screenshot's charts and counters show something)
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": admin}, timeout=30) as http:
            for wave in range(4):
                asks = [http.post("/v1/ask/support", json={"content": f"q{wave}.{i}"}) for i in range(10)]
                assert {r.status_code for r in await asyncio.gather(*asks)} == {200}
        await expect(page.locator("#total-processed")).to_have_text("40")
        SHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(SHOTS / "fleet.png"), full_page=True)

        # When it restarts the pool
        await page.get_by_role("button", name="Rolling restart of pool support").click()
        await expect(page.locator("#notice")).to_contain_text("Rolling restart of support started")

        # Then the agents change, one at a time, until 5 new processes are ready
        async def replaced() -> bool:
            now = await ready_pids(page, "support")
            return len(now) == 5 and not now & before

        deadline = time.monotonic() + 120
        while not await replaced():
            assert time.monotonic() < deadline, "the restart did not replace every agent"
            await asyncio.sleep(0.25)
        assert await page.evaluate("window.__sameDocument") is True

        # When it drains one agent, a replacement takes its place and the pool stays at 5
        after_restart = await ready_pids(page, "support")
        victim = agents(page, "support").first
        victim_pid = await victim.get_attribute("data-pid")
        await victim.get_by_role("button", name=re.compile("Drain")).click()
        await expect(page.locator("#notice")).to_contain_text("Draining")
        deadline = time.monotonic() + 60
        while (now := await ready_pids(page, "support")) == after_restart or len(now) != 5:
            assert time.monotonic() < deadline, "the drained agent was not replaced"
            await asyncio.sleep(0.25)
        assert victim_pid not in now and len(now & after_restart) == 4

        # When it sends a message in the playground
        await page.get_by_role("button", name="Playground").click()
        await page.get_by_label("Pool", exact=True).select_option("support")
        await watch_streaming(page)
        await page.get_by_label("Message", exact=True).fill("Hello! Which agent are you?")
        await page.get_by_role("button", name="Send").click()
        # Then the answer streams in, with the agent that answered and its timings
        answer = page.locator("li.answer").last
        await expect(answer).to_have_attribute("data-state", "done")
        meta = await answer.locator(".meta").text_content() or ""
        assert re.search(r"agent support-customer-support-\d+", meta), meta
        assert "first token" in meta and "total" in meta
        text = await answer.locator(".text").text_content() or ""
        assert text.startswith("[0 earlier] Re: Hello!"), text
        partial = await page.evaluate("window.__partials")
        assert len(set(partial)) >= 2 and partial[0] < len(text), (partial, len(text))  # chunk by chunk
        # And the thread goes on across messages
        await page.get_by_label("Message", exact=True).fill("And a follow-up")
        await page.get_by_role("button", name="Send").click()
        second = page.locator("li.answer").nth(1)
        await expect(second).to_have_attribute("data-state", "done")
        assert "[2 earlier]" in (await second.locator(".text").text_content() or "")  # its turn: 2 messages
        await page.screenshot(path=str(SHOTS / "playground.png"), full_page=True)
        assert page.errors == []  # type: ignore[attr-defined]
        await page.context.close()


async def watch_streaming(page: Page) -> None:
    """Record the answer's text length each time it grows while it streams (``window.__partials``)."""
    await page.evaluate(
        """() => {
          window.__partials = [];
          new MutationObserver(() => {
            const li = document.querySelector('li.answer[data-state=streaming]');
            const t = li && li.querySelector('.text');
            if (t && t.textContent.length) window.__partials.push(t.textContent.length);
          }).observe(document.getElementById('pg-log'),
                     {subtree: true, childList: true, characterData: true});
        }"""
    )


async def test_ask_only_key_reads_its_tenant_and_a_wrong_key_is_told(
    make_system, required: Settings, browser: Browser
) -> None:
    # Given pools of two tenants (the first's pt with an agent that has a tool), an ask-only key of the first
    system: System = await make_system(config=tenant_config(extra=TOOL_POOL))
    _, asker = await make_key(system, "ta", "ask")
    async with running_gateway(required, system.config) as url:
        page = await open_page(browser, url)
        # When a wrong key is tried
        await sign_in(page, "ap_0123456789abcdef_" + "x" * 43)
        # Then the page says so, in the API's words, and stays on the sign-in form
        await expect(page.get_by_role("alert")).to_contain_text("Sign-in failed: the API key is not valid")
        await expect(page.get_by_label("API key", exact=True)).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0

        # When the ask-only key signs in, with the keyboard alone (the field kept the focus)
        await page.keyboard.press("Control+A")
        await page.keyboard.type(asker)
        await page.keyboard.press("Enter")
        # Then it sees its tenant's pool and its agent, and no control that acts
        await expect(agents(page, "pa")).to_have_count(1)
        await expect(page.locator("section[data-pool]")).to_have_count(2)  # pa and pt: not tenant tb's pb
        await expect(page.locator('section[data-pool="pb"]')).to_have_count(0)
        await expect(page.get_by_text("read-only")).to_have_count(2)
        for name in ("Scale", "Rolling restart", "Drain"):
            await expect(page.get_by_role("button", name=re.compile(name))).to_have_count(0)
        await expect(page.locator("#who")).to_contain_text("tenant ta")
        # And at phone width nothing sticks out of the page (wide tables scroll inside their box)
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        # And the playground shows an agent's tool steps as they happen
        await page.get_by_role("button", name="Playground").click()
        await page.get_by_label("Pool", exact=True).select_option("pt")
        await page.get_by_label("Message", exact=True).fill('Where is A-1? @lookup_order {"order_id": "A-1"}')
        await page.get_by_role("button", name="Send").click()
        answer = page.locator("li.answer").last
        await expect(answer).to_have_attribute("data-state", "done")
        await expect(answer.locator(".steps li")).to_have_text(
            [
                re.compile(r'^tool lookup_order\(\{"order_id":"A-1"\}\)$'),
                re.compile(r"^result of lookup_order: .*shipped"),
            ]
        )
        await expect(answer.locator(".meta")).to_contain_text("agent pt-main-1")

        # And a bad message from the playground shows the API's error, not a blank page
        await page.get_by_label("Message", exact=True).fill("x" * 40_000)
        await page.get_by_role("button", name="Send").click()
        await expect(page.get_by_role("alert")).to_contain_text("VALIDATION_ERROR")
        await expect(page.locator("li.answer").last).to_have_attribute("data-state", "failed")
        assert page.errors == []  # type: ignore[attr-defined]
        await page.context.close()


TOOL_POOL = """
[agent_types.tooled]
system_prompt = "You look orders up."
provider = "fake"
tools = ["tests.agents_support:lookup_order"]

[pools.pt]
tenant = "ta"

[[pools.pt.deployments]]
name = "main"
agent_type = "tooled"
replicas = 1
"""

CPU_TICKS = os.sysconf("SC_CLK_TCK")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def browser_cpu_s() -> float:
    """CPU seconds used so far by this test's Chromium processes (user + system)."""
    total = 0
    for pid in _descendants(os.getpid()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if "chrom" in comm:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CPU_TICKS


async def test_page_stays_live_and_light_with_50_agents_at_20_rps(make_system, browser: Browser) -> None:
    # Given 50 agents (one pool; open gateway, so the page needs no sign-in)
    config = make_config(replicas=50, ttft_ms=20, tokens_per_s=400, reply_tokens=12)
    system: System = await make_system(config, start=False)
    try:
        await asyncio.gather(*(system.start_worker("p", "main", n) for n in range(1, 51)))
        await system.wait_members()
        async with running_gateway(system.settings, config) as url, httpx.AsyncClient(base_url=url) as http:
            page = await open_page(browser, url)
            await expect(agents(page, "p")).to_have_count(50)
            await page.evaluate(
                """() => {
                  window.__updates = [];
                  new MutationObserver(() => window.__updates.push(performance.now()))
                    .observe(document.body, {attributes: true, attributeFilter: ['data-updates']});
                }"""
            )
            # When 20 requests/s flow for 12 s (measured over the last 10)
            sent: list[int] = []

            async def one(i: int) -> None:
                r = await http.post("/v1/ask/p", json={"content": f"load {i}", "thread_id": f"t{i % 40}"})
                sent.append(r.status_code)

            tasks = []
            t0 = time.monotonic()
            cpu0 = wall0 = None
            for i in range(240):
                tasks.append(asyncio.create_task(one(i)))
                if i == 40:
                    cpu0, wall0 = browser_cpu_s(), time.monotonic()
                await asyncio.sleep(max(0.0, t0 + (i + 1) / 20 - time.monotonic()))
            assert cpu0 is not None and wall0 is not None
            cpu1, wall1 = browser_cpu_s(), time.monotonic()
            await asyncio.gather(*tasks)
            # Then the page updated at least every 2 s, and the browser used under half a core
            stamps = await page.evaluate("window.__updates")
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            cores = (cpu1 - cpu0) / (wall1 - wall0)
            print(
                f"\ndashboard at 50 agents, 20 req/s: {len(stamps)} updates, max gap {max(gaps):.0f} ms, "
                f"browser CPU {cores:.3f} cores over {wall1 - wall0:.1f} s"
            )
            assert sent.count(200) == 240, sent
            assert len(stamps) >= 10 and max(gaps) <= 2000, gaps
            assert 0 < cores < 0.5, cores
            await expect(page.locator("#total-processed")).to_have_text("240")  # heartbeats catch up
            await page.context.close()
    finally:
        await system.close()
        await cleanup_namespace(system.settings, config, max_replicas=50)
