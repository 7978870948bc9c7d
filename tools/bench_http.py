"""``ember bench --concurrency N,... --http``: the serving workload through the HTTP server and through the engine
directly, on the same pipeline, in one run.

Per level, N requests (prompts of ``bench_serving.distinct_prompts``, new ones for every measurement so that none
is served from the prefix cache; greedy, ``new_tokens`` each with EOS ignored) go to the engine directly
(``bench_serving.run_concurrent``: all submitted at once, stepped to the end) and, alternating with it round by
round, as N concurrent streaming ``POST /v1/completions`` to the OpenAI server (``ember.runtime.serve``) running on
127.0.0.1 in a thread of this process, from a client in a process of its own (``bench_http_client``). Through HTTP a token's time is when its chunk arrives at the client; a request's tokens
are counted from its ``usage``. On one machine the client's CPU time still counts against the server's.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember.runtime.engine import LLMEngine
from ember.runtime.scheduler import SchedulerConfig

from .bench_http_client import ClientProcess
from .bench_serving import distinct_prompts, median_of_runs, run_concurrent, summarize_stamps

MODEL_NAME = "bench"
WARM_UP_TOKENS = 4


def run_http_benchmark(pipeline: Any, tokenizer: Any, levels: Sequence[int], *, prompt_tokens: int = 64,
                       new_tokens: int = 128, runs: int = 3, scheduler: SchedulerConfig | None = None) -> dict[str, Any]:
    """Each level ``runs`` times through the engine and through HTTP (alternating which goes first), medians per
    level and the HTTP/engine ratios."""
    from ember.runtime.serve import ServedGenerator, ServedModels, create_app
    from ember.runtime.serve.background import BackgroundServer

    max_level = max(levels)
    if max_level > pipeline.pipeline_model.max_batch_size:
        raise ValueError(f"concurrency {max_level} exceeds the pipeline's batch limit "
                         f"{pipeline.pipeline_model.max_batch_size}; load it with --max-batch-size {max_level}")
    # Every measurement gets prompts of its own: a prompt seen before would be served from the prefix cache.
    pool = iter(distinct_prompts(tokenizer, 2 + 2 * runs * sum(levels), prompt_tokens))

    def fresh(n: int) -> list[list[int]]:
        return [next(pool) for _ in range(n)]

    served = ServedModels(ServedGenerator(MODEL_NAME, pipeline, tokenizer, scheduler))
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {"engine": {n: [] for n in levels},
                                                           "http": {n: [] for n in levels}}
    with BackgroundServer(create_app(served)) as server, ClientProcess() as client:
        def engine(n: int, tokens: int = new_tokens) -> dict[str, Any]:
            return run_concurrent(LLMEngine(pipeline, scheduler), fresh(n), tokens)

        def http(n: int, tokens: int = new_tokens) -> dict[str, Any]:
            level = client.run(server.base_url, fresh(n), tokens, MODEL_NAME)
            return summarize_stamps(level["submitted"], level["stamps"], level["wall_s"], level["output_tokens"])

        engine(1, WARM_UP_TOKENS)
        http(1, WARM_UP_TOKENS)
        for run in range(runs):
            for n in levels:
                order = (("engine", engine), ("http", http)) if run % 2 == 0 else (("http", http), ("engine", engine))
                for name, measure in order:
                    samples[name][n].append(measure(n))
    report: dict[str, Any] = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "levels": {}}
    for n in levels:
        ours, direct = median_of_runs(samples["http"][n]), median_of_runs(samples["engine"][n])
        report["levels"][n] = {"http": ours, "engine": direct,
                               "http_over_engine_tok_s": ours["output_tok_s"] / direct["output_tok_s"],
                               "samples": {name: samples[name][n] for name in samples}}
    return report
