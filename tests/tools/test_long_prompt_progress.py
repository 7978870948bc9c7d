"""A long prompt shows its progress (issue 17: "nothing is shown during ... a long prompt"): ``ember generate``
on a pseudo-terminal draws a "prompt" bar while a prompt of more than ``PROMPT_CHUNK_TOKENS`` tokens is computed
chunk by chunk, and the chunked prompt gives the tokens one call gives."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams
from ember.tools.generate import PROMPT_CHUNK_TOKENS, stream_text

from .test_chat import MAX_LENGTH, Terminal, chat_model, env  # noqa: F401 (fixtures)

PROMPT_TOKENS = PROMPT_CHUNK_TOKENS * 3 // 2


def test_chunked_long_prompt_gives_the_tokens_of_one_call(chat_model, tmp_path):
    config = PipelineConfig(model_path=chat_model, cache_dir=tmp_path, max_batch_size=1, max_length=MAX_LENGTH)
    _, pipeline = PIPELINE_REGISTRY.retrieve(config)
    prompt = [1] + np.random.default_rng(0).integers(4, 160, PROMPT_TOKENS - 1).tolist()
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    text = "".join(stream_text(pipeline, pipeline.tokenizer, prompt, sampling))
    assert text == pipeline.tokenizer.decode(pipeline.generate_tokens([prompt], sampling)[0])


def test_generate_draws_a_prompt_progress_bar_on_a_terminal(chat_model, env):
    words = " ".join(["hello"] * PROMPT_TOKENS)
    terminal = Terminal([sys.executable, "-m", "ember.tools", "generate", "--model", str(chat_model), "--max-length",
                         str(MAX_LENGTH), "--max-new-tokens", "2", "--no-chat-template", words], env)
    try:
        terminal.expect(r"prompt:\s+\d+%", timeout=120)
        assert terminal.wait(timeout=120) == 0
    finally:
        terminal.close()
