"""The checks of one decoder shape against transformers, shared by the per-architecture reference tests: a
pipeline compiled with the lowering the shape is there to exercise, the logits of the prompt and of 16 decode
steps within 1e-4 relative, and greedy tokens identical."""
from __future__ import annotations

import logging
from pathlib import Path

from ember.compiler.passes.lower_paged_attention import FORM as PAGED_FORM
from ember.graphs.nn import KVCacheStrategy
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits, SamplingParams

from .decode_loop import greedy_steps
from .test_llama_family import hf_greedy, hf_logits, relative_error

logger = logging.getLogger(__name__)

RTOL = 1e-4


def compiled_pipeline(directory: Path, cache_dir: Path, strategy: KVCacheStrategy, continuous_form: str,
                      max_batch_size: int = 4):
    """A pipeline returning every position's logits, compiled into ``cache_dir``; its attention lowered to
    ``continuous_form`` (CONTINUOUS) or the explicit paged form (PAGED), so a shape meets the lowering it is for."""
    config = PipelineConfig(model_path=directory, cache_dir=cache_dir, max_batch_size=max_batch_size,
                            kv_cache_strategy=strategy, return_logits=ReturnLogits.ALL)
    pipe = PIPELINE_REGISTRY.retrieve(config)[1]
    forms = {lowering["form"] for lowering in pipe.pipeline_model.artifact.manifest["lowerings"]}
    assert forms == {continuous_form if strategy is KVCacheStrategy.CONTINUOUS else PAGED_FORM}
    return pipe


def reference_greedy(hf_model, memo: dict, prompt: list[int], n: int) -> list[int]:
    """transformers' ``n`` greedy tokens after ``prompt``, computed once per memo (one per checkpoint)."""
    key = (tuple(prompt), n)
    if key not in memo:
        memo[key] = hf_greedy(hf_model, prompt, n)
    return memo[key]


def assert_logits_match(name: str, hf_model, pipe, prompt: list[int]) -> None:
    """Every position's logits: the prompt's (prefill) and 16 greedy decode steps', each within :data:`RTOL`."""
    tokens, ours = greedy_steps(pipe, prompt, 17)
    reference = hf_logits(hf_model, prompt + tokens[:-1])
    for what, rows in (("prefill", slice(0, len(prompt))), ("16 decode steps", slice(len(prompt), None))):
        abs_err, rel = relative_error(ours[rows], reference[rows])
        logger.info("%s %s: max abs error %.3g, relative %.3g", name, what, abs_err, rel)
        assert rel < RTOL, (name, what, abs_err, rel)
    assert pipe.pipeline_model.kv_manager.num_active == 0


def assert_greedy_matches(name: str, hf_model, memo: dict, pipe, prompts: list[list[int]], n: int = 24) -> None:
    """``n`` greedy tokens after each prompt, alone in the batch, are transformers' tokens."""
    sampling = SamplingParams(max_new_tokens=n, ignore_eos=True)
    for prompt in prompts:
        assert pipe.generate_tokens([prompt], sampling)[0] == reference_greedy(hf_model, memo, prompt, n), name
