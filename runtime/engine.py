"""The serving engine: requests in, streamed tokens out (vLLM's ``LLMEngine`` / ``AsyncLLMEngine`` roles).

:class:`LLMEngine` is synchronous: ``add_request`` queues a prompt, each ``step`` runs one scheduler step
over every request in flight (continuous batching) and returns the tokens it produced. ``generate`` runs
a batch of prompts to completion. :class:`AsyncLLMEngine` puts the same engine behind asyncio for a
server: ``generate`` is an async iterator of one request's outputs while a background task steps the
engine in a worker thread (the model call releases the GIL, so the event loop stays responsive);
leaving the iterator early (a client disconnect) cancels the request and frees its KV cache at once.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncGenerator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from .kv_cache.paged import PagedKVCacheManager
from .pipelines.context import SamplingParams
from .pipelines.text_generation import TextGenerationPipeline
from .scheduler import Scheduler, SchedulerConfig, StepOutput

logger = logging.getLogger(__name__)


class LLMEngine:
    """A scheduler over one text-generation pipeline."""

    def __init__(self, pipeline: TextGenerationPipeline, config: SchedulerConfig | None = None):
        self.pipeline = pipeline
        self.scheduler = Scheduler(pipeline.pipeline_model, config)
        self.runner = pipeline.runner
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def add_request(self, prompt_tokens: Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt (token ids); returns its request id. Too long a prompt is a ValueError here."""
        request_id = request_id or f"req-{next(self._ids)}"
        context = self.pipeline.new_context(prompt_tokens, sampling, request_id)
        with self._lock:
            self.scheduler.add(context)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        with self._lock:
            return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # --- read-only KV cache figures for the server's /metrics (runtime/serve/metrics.py) ---------------------
    def kv_cache_usage(self) -> dict[str, int | str]:
        """The KV cache's occupancy now, read without the step lock (a snapshot; it may be mid-step).

        ``unit`` is ``page`` (paged: ``used`` pages held by a request, ``free`` pages an allocation can take,
        evictable prefix-cache pages included, ``total`` all but the scratch page) or ``slot`` (continuous).
        ``prefix_cache_queries`` / ``prefix_cache_hits``: prompt tokens admitted and those served from the prefix
        cache, since the engine's model was loaded (0 for the continuous strategy, which has no prefix cache)."""
        manager = self.pipeline.pipeline_model.kv_manager
        if not isinstance(manager, PagedKVCacheManager):
            return {"unit": "slot", "used": manager.num_active, "free": manager.free_slots,
                    "total": manager.max_batch_size, "prefix_cache_queries": 0, "prefix_cache_hits": 0}
        pool = manager.pool
        return {"unit": "page", "used": pool.num_referenced, "free": pool.num_available, "total": pool.num_usable,
                "prefix_cache_queries": manager.prompt_tokens_requested,
                "prefix_cache_hits": manager.prompt_tokens_cached}
    # --- end of the read-only KV cache figures --------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One scheduler step over every request in flight: schedule, execute (the model runner), update."""
        with self._lock:
            return self.scheduler.step(self.runner)

    def stream(self) -> Iterator[StepOutput]:
        """Step until nothing is left, yielding every output as it comes."""
        while self.has_unfinished_requests():
            yield from self.step()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None) -> list[list[int]]:
        """Generated tokens for each prompt, all run together."""
        ids = [self.add_request(p, sampling) for p in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        for out in self.stream():
            if out.request_id in tokens and out.token is not None:
                tokens[out.request_id].append(out.token)
        return [tokens[i] for i in ids]


class AsyncLLMEngine:
    """:class:`LLMEngine` for asyncio: per-request async streams, one background stepping task."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[StepOutput]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-engine")
        self._loop_task: asyncio.Task | None = None

    async def generate(self, prompt_tokens: Sequence[int], sampling: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncGenerator[StepOutput, None]:
        """One request's outputs, token by token, until it finishes (or the caller stops iterating)."""
        request_id = self.engine.add_request(prompt_tokens, sampling, request_id)
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        self._ensure_running()
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort_request(request_id)
                logger.info("request %s cancelled", request_id)

    def _ensure_running(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.engine.has_unfinished_requests():
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as error:  # every waiting stream learns of it, none hangs
                logger.exception("engine step failed")
                for request_id, queue in list(self._queues.items()):
                    self.engine.abort_request(request_id)
                    queue.put_nowait(StepOutput(request_id, None, error=f"{type(error).__name__}: {error}"))
                return
            for output in outputs:
                waiting = self._queues.get(output.request_id)
                if waiting is not None:
                    waiting.put_nowait(output)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
