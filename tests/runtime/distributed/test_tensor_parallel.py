"""Tensor parallelism end to end: real rank processes joined by torch.distributed over gloo, against the
single-process build of the same weights (logits within 1e-5 relative, greedy tokens identical), both KV cache
strategies; the SmolLM2 split the issue names; counts that do not divide refused at compile time."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch.distributed", reason="tensor parallelism runs over torch.distributed (the test extra)")

from ember.graphs.nn import KVCacheStrategy  # noqa: E402
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits, SamplingParams  # noqa: E402
from tests.reference.conftest import smollm2_path  # noqa: E402,F401 (fixture)
from tests.reference.decode_loop import decode_steps  # noqa: E402
from tests.runtime.distributed.tiny_llama import save_tiny_llama  # noqa: E402

RTOL = 1e-5
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 12, 13, 99, 140, 3, 60, 61, 62, 8, 9]]

# Six heads so that 2 and 3 ranks both divide them; an intermediate size and a vocabulary neither divides (uneven MLP
# slices, a padded vocabulary slice).
SHAPES = {
    # GQA (3 KV heads: 3 ranks get one each; 2 ranks: refused), untied head, q/k/v and o_proj bias
    "gqa-bias": dict(num_attention_heads=6, num_key_value_heads=3, attention_bias=True, tie_word_embeddings=False),
    # MQA (1 KV head, fewer than the ranks: copied to each), tied head
    "mqa-tied": dict(num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True),
    # GQA with 2 KV heads (2 ranks: one each)
    "gqa2": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made = {}

    def get(shape: str):
        if shape not in made:
            made[shape] = save_tiny_llama(tmp_path_factory.mktemp(shape), **SHAPES[shape])
        return made[shape]
    return get


def _pipeline(directory, cache_dir, strategy: KVCacheStrategy, tensor_parallel: int):
    config = PipelineConfig(model_path=directory, cache_dir=cache_dir, kv_cache_strategy=strategy, max_batch_size=4,
                            return_logits=ReturnLogits.ALL, tensor_parallel=tensor_parallel, num_threads=1,
                            kv_cache_bytes=64 << 20)
    return PIPELINE_REGISTRY.retrieve(config)[1]


def close(pipe) -> None:
    group = getattr(pipe.pipeline_model.model, "group", None)
    if group is not None:
        group.close()


@pytest.mark.parametrize("shape,world,strategy", [
    ("gqa-bias", 3, KVCacheStrategy.PAGED),
    ("gqa-bias", 3, KVCacheStrategy.CONTINUOUS),
    ("mqa-tied", 2, KVCacheStrategy.CONTINUOUS),
    ("mqa-tied", 3, KVCacheStrategy.PAGED),
    ("gqa2", 2, KVCacheStrategy.PAGED),
])
def test_ranks_give_the_single_process_logits_and_tokens(checkpoint, tmp_path, shape, world, strategy):
    directory = checkpoint(shape)
    single = _pipeline(directory, tmp_path, strategy, 1)
    split = _pipeline(directory, tmp_path, strategy, world)
    try:
        manifest = split.pipeline_model.artifact.manifest
        assert manifest["tensor_parallel"]["world_size"] == world and len(manifest["ranks"]) == world
        assert all(len(rank["stages"]) == 2 * 2 + 3 for rank in manifest["ranks"])
        for prompt in PROMPTS:
            tokens, steps, positions = decode_steps(split, prompt, 8)
            want_tokens, want_steps, want_positions = decode_steps(single, prompt, 8)
            scale = np.abs(want_positions).max()
            np.testing.assert_allclose(positions, want_positions, rtol=RTOL, atol=RTOL * scale)
            assert tokens == want_tokens
        sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
        assert split.generate_tokens(PROMPTS, sampling) == single.generate_tokens(PROMPTS, sampling)
        assert split.pipeline_model.kv_manager.num_active == 0
    finally:
        close(split)


def test_counts_that_do_not_divide_are_refused_at_compile_time(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="6 attention heads do not divide into 4"):
        _pipeline(checkpoint("gqa2"), tmp_path, KVCacheStrategy.PAGED, 4)
    with pytest.raises(ValueError, match="3 KV heads neither divide into 2 parts"):
        _pipeline(checkpoint("gqa-bias"), tmp_path, KVCacheStrategy.PAGED, 2)


@pytest.mark.slow
def test_smollm2_over_three_ranks_and_two_refused(smollm2_path, tmp_path):
    prompt = list(range(400, 420))
    sampling = SamplingParams(max_new_tokens=16, ignore_eos=True)
    config = dict(model_path=smollm2_path, cache_dir=tmp_path, encoding="float32", max_length=256, num_threads=1,
                  kv_cache_strategy=KVCacheStrategy.PAGED)
    with pytest.raises(ValueError, match="9 attention heads do not divide into 2"):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(**config, tensor_parallel=2))
    split = PIPELINE_REGISTRY.retrieve(PipelineConfig(**config, tensor_parallel=3))[1]
    try:
        tokens = split.generate_tokens([prompt], sampling)
    finally:
        close(split)
    single = PIPELINE_REGISTRY.retrieve(PipelineConfig(**config))[1]
    assert tokens == single.generate_tokens([prompt], sampling)


def test_speculative_decoding_over_ranks_keeps_the_greedy_tokens(checkpoint, tmp_path):
    """Verification rows and the release of rejected drafts' pages go through the same mirrored operations."""
    prompt = [5, 17, 33, 2, 90, 5, 17, 33, 2, 90, 5, 17]  # repeats: n-gram drafts to verify
    sampling = SamplingParams(max_new_tokens=16, ignore_eos=True)
    common = dict(model_path=checkpoint("gqa2"), cache_dir=tmp_path, max_batch_size=2, num_threads=1,
                  kv_cache_bytes=64 << 20)
    plain = PIPELINE_REGISTRY.retrieve(PipelineConfig(**common, kv_cache_strategy=KVCacheStrategy.PAGED))[1]
    split = PIPELINE_REGISTRY.retrieve(PipelineConfig(**common, speculative="ngram", tensor_parallel=2))[1]
    try:
        assert split.generate_tokens([prompt], sampling) == plain.generate_tokens([prompt], sampling)
        assert split.pipeline_model.kv_manager.num_active == 0
    finally:
        close(split)


@pytest.fixture(scope="module")
def block_aligned(tmp_path_factory):
    """Row-parallel slices (o_proj's 128 inputs, down_proj's 256, over 2 ranks) that are whole 32-weight blocks."""
    return save_tiny_llama(tmp_path_factory.mktemp("block-aligned"), hidden_size=128, intermediate_size=256,
                           head_dim=32, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _encoded(directory, cache_dir, encoding: str, tensor_parallel: int):
    return PIPELINE_REGISTRY.retrieve(PipelineConfig(
        model_path=directory, cache_dir=cache_dir, encoding=encoding, kv_cache_strategy=KVCacheStrategy.PAGED,
        max_batch_size=2, return_logits=ReturnLogits.ALL, tensor_parallel=tensor_parallel, num_threads=1,
        kv_cache_bytes=64 << 20))[1]


@pytest.mark.parametrize("encoding", ["q4_0", "q8_0"])
def test_quantized_ranks_with_whole_blocks_give_the_single_process_logits(block_aligned, tmp_path, encoding):
    """Each rank's slice of a quantized weight holds the same blocks as the whole weight: the same numbers."""
    single = _encoded(block_aligned, tmp_path, encoding, 1)
    split = _encoded(block_aligned, tmp_path, encoding, 2)
    try:
        tokens, _, positions = decode_steps(split, PROMPTS[0], 8)
        want_tokens, _, want_positions = decode_steps(single, PROMPTS[0], 8)
        np.testing.assert_allclose(positions, want_positions, rtol=RTOL, atol=RTOL * np.abs(want_positions).max())
        assert tokens == want_tokens
    finally:
        close(split)


def test_quantized_ranks_whose_slices_cut_blocks_are_as_accurate_as_one_process(checkpoint, tmp_path):
    """o_proj's 96 inputs over 2 ranks are 48 each: a rank's slice is quantized in its own blocks, so its numbers
    differ from the single build's, but not its distance from float32 (at the prompt's positions)."""
    directory = checkpoint("gqa2")
    reference = decode_steps(_encoded(directory, tmp_path, "float32", 1), PROMPTS[1], 1)[2]
    single = decode_steps(_encoded(directory, tmp_path, "q4_0", 1), PROMPTS[1], 1)[2]
    split_pipeline = _encoded(directory, tmp_path, "q4_0", 2)
    try:
        split = decode_steps(split_pipeline, PROMPTS[1], 1)[2]
    finally:
        close(split_pipeline)
    scale = np.abs(reference).max()
    single_error = np.abs(single - reference).max() / scale
    split_error = np.abs(split - reference).max() / scale
    assert 0 < split_error <= 1.25 * single_error, (split_error, single_error)
