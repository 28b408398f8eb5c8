"""SSE resume: Last-Event-ID continues a stream on another gateway; GET /v1/requests/{id}."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import System, running_gateway
from tests.test_gateway import parse_sse

pytestmark = pytest.mark.timeout(60)


async def test_resume_on_another_gateway_with_last_event_id(make_system) -> None:
    system: System = await make_system(replicas=1, tokens_per_s=40, reply_tokens=30)
    async with (
        running_gateway(system.settings, system.config) as url_a,
        running_gateway(system.settings, system.config) as url_b,
        httpx.AsyncClient(base_url=url_a) as a,
        httpx.AsyncClient(base_url=url_b) as b,
    ):
        seen: list[dict[str, str]] = []
        async with a.stream("POST", "/v1/ask/p", json={"content": "resume me", "stream": True}) as r:
            rid = r.headers["x-request-id"]
            buf = ""
            async for text in r.aiter_text():
                buf += text
                *blocks, buf = buf.split("\n\n")
                seen += parse_sse("\n\n".join(blocks)) if blocks else []
                if sum(e.get("event") == "chunk" for e in seen) >= 5:
                    break  # the connection to gateway A drops
        last_id = seen[-1]["id"]
        # Reconnect to gateway B with Last-Event-ID: the stream continues from the next event
        r2 = await b.get(
            f"/v1/requests/{rid}", headers={"Accept": "text/event-stream", "Last-Event-ID": last_id}
        )
        rest = parse_sse(r2.text)
        assert rest[0]["id"] > last_id or rest[0]["id"] != last_id
        assert rest[-1]["event"] in ("end", "error")
        ids = [e["id"] for e in seen + rest]
        assert len(ids) == len(set(ids))  # nothing delivered twice
        # (a client that left mid-stream cancels the request; so a resumed stream of a cancelled
        # request ends with an error event, while the chunks seen + resumed are contiguous)
        full = await b.get(f"/v1/requests/{rid}", headers={"Accept": "text/event-stream"})
        all_ids = [e["id"] for e in parse_sse(full.text)]
        assert all_ids == ids


async def test_get_request_returns_result_or_running(make_system) -> None:
    system: System = await make_system(replicas=1, ttft_ms=1500)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        async with http.stream("POST", "/v1/ask/p", json={"content": "background job", "stream": True}) as r:
            rid = r.headers["x-request-id"]
            checked = False
            async for line in r.aiter_lines():
                if line.startswith("event: start") and not checked:
                    # While the agent works on it: 202 running
                    running = await http.get(f"/v1/requests/{rid}")
                    assert running.status_code == 202
                    assert running.json() == {"request_id": rid, "status": "running"}
                    checked = True
                if line.startswith("event: end"):
                    break
            assert checked
        # Once done: the answer
        done = await http.get(f"/v1/requests/{rid}")
        assert done.status_code == 200
        assert done.json()["content"].startswith("[0 earlier] Re: background job")


async def test_a_last_event_id_redis_would_refuse_is_a_400_and_breaks_no_stream(make_system) -> None:
    """The reply reader shares one XREAD across requests: one bad id must never reach it."""
    system: System = await make_system(replicas=1)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        rid = (await http.post("/v1/ask/p", json={"content": "first"})).json()["request_id"]
        sse = {"Accept": "text/event-stream"}
        # Given ids of the right shape whose parts overflow 64 bits (Redis: "Invalid stream ID")
        for bad in ("18446744073709551616-0", "0-99999999999999999999", "garbage", "1-1-1"):
            r = await http.get(f"/v1/requests/{rid}", headers={**sse, "Last-Event-ID": bad})
            # Then each is refused with the error body
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error_code"] == "VALIDATION_ERROR"
        # And every stream still reads normally: a full replay of the finished request
        replay = parse_sse((await http.get(f"/v1/requests/{rid}", headers=sse)).text)
        assert replay[-1]["event"] == "end"
        # A client that already has the final event (an EventSource reconnects after each close)
        # gets 204, SSE's "do not reconnect", at once; the largest valid id is past everything
        for after in (replay[-1]["id"], "18446744073709551615-0"):
            again = await http.get(f"/v1/requests/{rid}", headers={**sse, "Last-Event-ID": after}, timeout=3)
            assert again.status_code == 204, (after, again.text)
        # Resuming before the end still streams the rest
        rest = parse_sse(
            (await http.get(f"/v1/requests/{rid}", headers={**sse, "Last-Event-ID": replay[-2]["id"]})).text
        )
        assert [e["event"] for e in rest] == ["end"]
        ok = await http.post("/v1/ask/p", json={"content": "second"})
        assert ok.status_code == 200 and ok.json()["content"]



SSE = {"Accept": "text/event-stream"}


class Events:
    """The events of one streaming SSE response, read as far as a test asks."""

    def __init__(self, response: httpx.Response) -> None:
        self.seen: list[dict[str, str]] = []
        self._text = response.aiter_text()
        self._buf = ""

    async def until(self, chunks: int = 10**6) -> list[dict[str, str]]:
        """Read until ``chunks`` chunk events have come (or the stream ends)."""
        async for text in self._text:
            self._buf += text
            *blocks, self._buf = self._buf.split("\n\n")
            self.seen += parse_sse("\n\n".join(blocks)) if blocks else []
            if sum(e.get("event") == "chunk" for e in self.seen) >= chunks:
                break
        return self.seen


def _text(events: list[dict[str, str]]) -> str:
    return "".join(json.loads(e["data"])["text"] for e in events if e.get("event") == "chunk")


async def test_a_second_reader_leaving_does_not_cancel_the_request(make_system) -> None:
    system: System = await make_system(replicas=1, tokens_per_s=60, reply_tokens=30)
    gateway = running_gateway(system.settings, system.config)
    async with gateway as url, httpx.AsyncClient(base_url=url) as http:
        # Given a caller streaming an answer
        async with http.stream("POST", "/v1/ask/p", json={"content": "keep going", "stream": True}) as r:
            rid = r.headers["x-request-id"]
            events = Events(r)
            await events.until(1)
            # When a second reader opens the stream, reads one chunk and leaves
            async with http.stream("GET", f"/v1/requests/{rid}", headers=SSE) as other:
                await Events(other).until(1)
            # Then the caller still gets the whole answer, not error CANCELLED
            mine = await events.until()
        assert mine[-1]["event"] == "end", mine[-1]
        assert _text(mine) == json.loads(mine[-1]["data"])["content"]


async def test_delete_cancels_a_running_request_and_409s_an_ended_one(make_system) -> None:
    system: System = await make_system(replicas=1, tokens_per_s=20, reply_tokens=200)
    gateway = running_gateway(system.settings, system.config)
    async with gateway as url, httpx.AsyncClient(base_url=url) as http:
        async with http.stream("POST", "/v1/ask/p", json={"content": "long", "stream": True}) as r:
            rid = r.headers["x-request-id"]
            events = Events(r)
            await events.until(1)
            # A Last-Event-ID past the newest event of a running request: 400, not an idle stream
            past = await http.get(f"/v1/requests/{rid}", headers={**SSE, "Last-Event-ID": "99999999999999-0"})
            assert past.status_code == 400 and past.json()["details"]["header"] == "Last-Event-ID", past.text
            # DELETE cancels it: the caller's stream ends with error CANCELLED
            cancelled = await http.delete(f"/v1/requests/{rid}")
            assert cancelled.status_code == 202, cancelled.text
            assert cancelled.json() == {"request_id": rid, "status": "cancelling"}
            seen = await events.until()
        assert seen[-1]["event"] == "error" and json.loads(seen[-1]["data"])["error_code"] == "CANCELLED"
        # An ended request: 409; an unknown one: 404
        again = await http.delete(f"/v1/requests/{rid}")
        assert again.status_code == 409 and again.json()["error_code"] == "REQUEST_ENDED", again.text
        assert (await http.delete("/v1/requests/nope")).status_code == 404
