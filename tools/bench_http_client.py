"""The load generator of ``ember bench --http``: N concurrent streaming completions, each token's arrival timed.

It runs in a process of its own (``ClientProcess``) and speaks HTTP/1.1 through h11 (the protocol library uvicorn
itself uses) on asyncio streams. Both choices keep the client's cost out of what is measured as far as one machine
allows: a general-purpose async client (httpx) spent ~0.75 ms of CPU per streamed token here, six times the
server's ~0.12 ms, and in the server's process it would also hold the GIL the server and the engine need.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import h11

if TYPE_CHECKING:
    from typing import Self

READ_BYTES = 65536


async def _stream_one(host: str, port: int, body: dict[str, Any], stamps: list[float]) -> int:
    """POST one streamed completion; the arrival time of each event with text into ``stamps``; its token count
    (from the final usage event)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    connection = h11.Connection(h11.CLIENT)
    headers = [("Host", f"{host}:{port}"), ("Content-Type", "application/json"),
               ("Content-Length", str(len(payload))), ("Connection", "close")]
    writer.write(connection.send(h11.Request(method="POST", target="/v1/completions", headers=headers)))
    writer.write(connection.send(h11.Data(data=payload)))
    writer.write(connection.send(h11.EndOfMessage()))
    await writer.drain()
    tokens, pending = 0, b""
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(READ_BYTES))
            elif isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise RuntimeError(f"HTTP {event.status_code} from the server")
            elif isinstance(event, h11.Data):
                now = time.perf_counter()
                pending += bytes(event.data)
                *events, pending = pending.split(b"\n\n")
                for raw in events:
                    if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                        continue
                    chunk = json.loads(raw[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"the stream failed: {chunk['error']['message']}")
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        stamps.append(now)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return tokens
    finally:
        writer.close()


async def _level(base_url: str, prompts: Sequence[Sequence[int]], new_tokens: int, model: str) -> dict[str, Any]:
    url = urlsplit(base_url)
    if url.scheme != "http" or url.hostname is None:
        raise ValueError(f"{base_url}: the benchmark client speaks plain HTTP to http://HOST[:PORT]")
    host, port = url.hostname, url.port or 80
    submitted: dict[str, float] = {}
    stamps: dict[str, list[float]] = {}

    async def one(i: int, prompt: Sequence[int]) -> int:
        body = {"model": model, "prompt": list(prompt), "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        submitted[str(i)] = time.perf_counter()
        stamps[str(i)] = []
        return await _stream_one(host, port, body, stamps[str(i)])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return {"submitted": submitted, "stamps": stamps, "wall_s": time.perf_counter() - start,
            "output_tokens": sum(counts)}


def stream_level(base_url: str, prompts: Sequence[Sequence[int]], new_tokens: int, model: str) -> dict[str, Any]:
    """All prompts as concurrent streams: submit and token times (this process's clock), wall time, tokens."""
    return asyncio.run(_level(base_url, prompts, new_tokens, model))


class ClientProcess:
    """A process that runs :func:`stream_level` on request (``spawn``: no copy of the server's threads or models)."""

    def __enter__(self) -> Self:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
        return self

    def run(self, base_url: str, prompts: Sequence[Sequence[int]], new_tokens: int, model: str) -> dict[str, Any]:
        return self._pool.submit(stream_level, base_url, [list(p) for p in prompts], new_tokens, model).result()

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)
