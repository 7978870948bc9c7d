"""Generating text for one prompt, streamed as text deltas, with timing statistics.

:func:`stream_text` is the one generation loop of the command line (``ember generate`` and ``ember chat``):
it yields text as tokens are made, never a partial UTF-8 character (the incremental detokenizer holds one
back until the next token completes it), and stopping early (Ctrl-C, a closed pipe) frees the request's KV
cache at once.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from ember.runtime.pipelines import SamplingParams
from ember.runtime.scheduler import SchedulerConfig

logger = logging.getLogger(__name__)


def build_prompt(tokenizer: Any, prompt: str, *, system: str | None = None, chat_template: bool = True) -> list[int]:
    """Token ids for ``prompt``: rendered by the chat template when the tokenizer has one and it is wanted."""
    if chat_template and tokenizer.has_chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages)
    if system:
        logger.warning("--system is ignored without a chat template")
    return tokenizer.encode(prompt)


@dataclass
class GenerationStats:
    """What one generation took. Times are seconds from the start of generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_token_seconds: float | None = None
    total_seconds: float = 0.0
    finish_reason: str | None = None

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first, over the time after the first."""
        if self.first_token_seconds is None or self.generated_tokens < 2:
            return None
        elapsed = self.total_seconds - self.first_token_seconds
        return (self.generated_tokens - 1) / elapsed if elapsed > 0 else None

    def describe(self) -> str:
        ttft = "n/a" if self.first_token_seconds is None else f"{self.first_token_seconds * 1000:.0f} ms"
        rate = self.decode_tokens_per_second
        rate_text = "n/a" if rate is None else f"{rate:.1f} tok/s"
        return (f"prompt {self.prompt_tokens} tokens, generated {self.generated_tokens} tokens "
                f"({self.finish_reason or 'unfinished'}), time to first token {ttft}, decode {rate_text}")


#: Prompts longer than this are computed in chunks of this many tokens with a progress bar (on a terminal): an 8k
#: prompt takes about a minute on a small CPU, which must not look like a hang. Shorter ones run in one call.
PROMPT_CHUNK_TOKENS = 1024


def stream_text(pipeline: Any, tokenizer: Any, prompt_ids: list[int], sampling: SamplingParams,
                stats: GenerationStats | None = None) -> Generator[str, None, None]:
    """Generate from ``prompt_ids``, yielding the decoded text as it grows; fills ``stats`` as it goes."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    context = pipeline.new_context(prompt_ids, sampling)
    detokenizer = tokenizer.detokenizer()
    start = time.perf_counter()
    long_prompt = len(prompt_ids) > PROMPT_CHUNK_TOKENS
    bar = tqdm(total=len(prompt_ids), unit="tok", desc="prompt", disable=None if long_prompt else True,
               leave=False)
    config = SchedulerConfig(max_num_batched_tokens=PROMPT_CHUNK_TOKENS) if long_prompt else None

    def on_step(_decision) -> None:
        bar.update(min(context.start_idx, len(prompt_ids)) - bar.n)
        if context.start_idx >= len(prompt_ids):
            bar.close()

    # closing(): if the caller stops early, the generator's cleanup (which releases the KV cache) runs now,
    # not whenever the exception's traceback is dropped.
    with bar, contextlib.closing(pipeline.generate([context], num_steps=1, scheduler_config=config,
                                                   on_step=on_step)) as steps:
        for step in steps:
            response = step.get(context.request_id)
            if response is None:
                continue
            now = time.perf_counter() - start
            if stats.first_token_seconds is None:
                stats.first_token_seconds = now
            stats.generated_tokens += 1
            stats.total_seconds = now
            delta = detokenizer.add([response.token])
            if delta:
                yield delta
    tail = detokenizer.flush()
    if tail:
        yield tail
    stats.total_seconds = time.perf_counter() - start
    stats.finish_reason = context.finish_reason.value if context.finish_reason is not None else None
