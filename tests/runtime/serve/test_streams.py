"""Streams under load and when clients leave: a client that disconnects mid-stream cancels its request (every KV
cache page is free afterwards, read from ``/metrics``), and 64 concurrent streams of 64 tokens finish without an
error and leave every page free. Both bounded in time."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from .conftest import LLAMA, MAX_BATCH

LOAD_STREAMS, LOAD_TOKENS = 64, 64
LOAD_TIMEOUT_S = 120


def _aborted(server) -> float:
    return server.metrics().get(f"ember_requests_finished_total{{finish_reason=abort,model={LLAMA}}}", 0.0)


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_cancels_its_request_and_frees_its_pages(server, n):
    server.wait_idle()
    aborted = _aborted(server)
    generated = server.gauge("ember_generation_tokens_total")
    body = {"model": LLAMA, "prompt": "the river and the town", "max_tokens": 900, "ignore_eos": True,
            "temperature": 0, "stream": True, "n": n}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{server.v1}/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):  # three events, then the client leaves (closing the connection)
            assert next(lines).startswith("data: ")
            assert next(lines) == ""
    server.wait_idle()  # bounded: fails if the pages are not freed
    assert server.gauge("ember_kv_cache_pages_used") == 0
    assert _aborted(server) == aborted + n  # cancelled, not finished
    assert server.gauge("ember_generation_tokens_total") - generated < n * 900


def test_64_concurrent_streams_finish_without_errors_and_free_every_page(server, async_client):
    assert MAX_BATCH >= LOAD_STREAMS
    server.wait_idle()
    before = server.metrics()

    async def one(i: int) -> tuple[int, int]:
        stream = await async_client.completions.create(
            model=LLAMA, prompt=f"the river {'and the town ' * (i % 7)}runs", max_tokens=LOAD_TOKENS, temperature=0.7,
            seed=i, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks, usage = 0, None
        async for chunk in stream:
            if chunk.choices:
                chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
        return chunks, usage.completion_tokens

    async def load():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(LOAD_STREAMS))), LOAD_TIMEOUT_S)

    start = time.monotonic()
    results = asyncio.run(load())
    elapsed = time.monotonic() - start
    assert [tokens for _, tokens in results] == [LOAD_TOKENS] * LOAD_STREAMS
    assert all(chunks >= 1 for chunks, _ in results)
    server.wait_idle()
    after = server.metrics()
    assert after["ember_kv_cache_pages_used{model=tiny-llama,unit=page}"] == 0
    assert after["ember_kv_cache_pages_free{model=tiny-llama,unit=page}"] == \
        after["ember_kv_cache_pages_total{model=tiny-llama,unit=page}"]
    generated = "ember_generation_tokens_total{model=tiny-llama}"
    assert after[generated] - before.get(generated, 0) == LOAD_STREAMS * LOAD_TOKENS
    ttft = "ember_time_to_first_token_seconds_count{model=tiny-llama}"
    assert after[ttft] - before.get(ttft, 0) == LOAD_STREAMS
    itl = "ember_inter_token_latency_seconds_count{model=tiny-llama}"
    assert after[itl] - before.get(itl, 0) == LOAD_STREAMS * (LOAD_TOKENS - 1)
    print(f"{LOAD_STREAMS} streams x {LOAD_TOKENS} tokens in {elapsed:.1f} s")


def test_metrics_report_the_prefix_cache(server):
    server.wait_idle()
    prompt = " ".join(["the river and the town"] * 12)  # several full pages
    body = {"model": LLAMA, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    for _ in range(2):
        assert httpx.post(f"{server.v1}/completions", json=body, timeout=30).status_code == 200
    assert server.gauge("ember_prefix_cache_hits_total") > 0
    assert 0 < server.gauge("ember_prefix_cache_hit_rate") <= 1
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("ember_requests_running", "ember_requests_waiting", "ember_kv_cache_pages_used",
                 "ember_kv_cache_pages_free", "ember_time_to_first_token_seconds_bucket",
                 "ember_inter_token_latency_seconds_bucket", "ember_prompt_tokens_total",
                 "ember_generation_tokens_total"):
        assert name in text, name


def test_streams_are_server_sent_events_ending_in_done(server):
    """The SSE framing: every event is ``data: <json>``, the last ``data: [DONE]``."""
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "the river"}], "max_tokens": 3,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
