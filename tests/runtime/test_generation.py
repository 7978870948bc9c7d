"""Generation behaviour: sampling, stopping, queueing when the KV cache is full, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from ember.runtime.backends import OrtCpuBackend
from ember.runtime.kv_cache import ContinuousKVCacheManager, KVCacheExhausted, KVCacheParams
from ember.runtime.pipelines import PIPELINE_REGISTRY, FinishReason, ModelSource, PipelineConfig, SamplingParams
from ember.runtime.pipelines.sampling import sample_row

from ..reference.tiny_models import make_model


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    make_model("qwen2-bias", directory)
    config = PipelineConfig(model_path=directory, cache_dir=tmp_path_factory.mktemp("cache"), max_batch_size=2,
                            max_length=64)
    return PIPELINE_REGISTRY.retrieve(config)[1]


def test_more_prompts_than_slots_are_queued_not_failed(pipe):
    prompts = [[1, 10 + i, 20 + i] for i in range(5)]  # 5 requests, 2 slots
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    together = pipe.generate_tokens(prompts, params)
    assert together == [pipe.generate_tokens([p], params)[0] for p in prompts]
    assert pipe.pipeline_model.kv_manager.num_active == 0


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed(pipe):
    def run(seed):
        return pipe.generate_tokens([[1, 30, 31]], SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=seed,
                                                                max_new_tokens=12, ignore_eos=True))[0]
    assert run(7) == run(7)
    assert any(run(7) != run(s) for s in (8, 9, 10))


def test_generation_stops_at_any_eos_id_and_at_max_tokens(pipe):
    greedy = pipe.generate_tokens([[1, 40, 41]], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    stop_at = greedy[3]
    ctx = pipe.new_context([1, 40, 41], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,)))
    list(pipe.generate([ctx]))
    assert ctx.generated == greedy[:greedy.index(stop_at) + 1] and ctx.finish_reason is FinishReason.STOP
    ctx = pipe.new_context([1, 40, 41], SamplingParams(max_new_tokens=5, ignore_eos=True))
    list(pipe.generate([ctx], num_steps=4))
    assert len(ctx.generated) == 5 and ctx.finish_reason is FinishReason.LENGTH
    # the model's maximum length also ends a request
    ctx = pipe.new_context(list(range(1, 60)), SamplingParams(ignore_eos=True))
    list(pipe.generate([ctx], num_steps=8))
    assert len(ctx.tokens) == 64 and ctx.finish_reason is FinishReason.LENGTH


def test_multi_step_decode_matches_single_steps(pipe):
    params = SamplingParams(max_new_tokens=15, ignore_eos=True)
    one = pipe.generate_tokens([[1, 50, 51], [1, 52]], params, num_steps=1)
    many = pipe.generate_tokens([[1, 50, 51], [1, 52]], params, num_steps=6)
    assert one == many


def test_prompt_longer_than_the_model_allows(pipe):
    with pytest.raises(ValueError, match="maximum length is 64"):
        pipe.new_context(list(range(1, 80)))


def test_max_length_over_the_model_limit(tmp_path, cache_dir):
    make_model("llama-mqa-linear", tmp_path)
    with pytest.raises(ValueError, match="upper bound 256"):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=tmp_path, cache_dir=cache_dir, max_length=1000))


@pytest.mark.parametrize("layout, message", [
    ({}, "no config.json"),
    ({"config.json": "{}"}, "no \\*.safetensors"),
])
def test_directories_that_are_not_models(tmp_path, layout, message):
    for name, text in layout.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        ModelSource.resolve(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelSource.resolve(tmp_path / "missing")


def test_sampling_filters():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 4.8], np.float32)
    rng = np.random.default_rng(0)
    assert sample_row(logits, SamplingParams(), rng) == 1
    assert {sample_row(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)} == {1, 2}
    picks = {sample_row(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert picks <= {1, 2} and 1 in picks
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_kv_manager_keeps_slots_packed_and_data_with_its_owner():
    params = KVCacheParams(dtype="float32", n_kv_heads=1, head_dim=2, num_layers=1)
    manager = ContinuousKVCacheManager(params, max_batch_size=3, max_seq_len=4, backend=OrtCpuBackend())
    for rid, value in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        slot = manager.claim(rid)
        manager.keys[0][slot, :, :2] = value
        manager.step(rid, 2)
    with pytest.raises(KVCacheExhausted):
        manager.claim("d")
    manager.release("a")  # "c" moves into slot 0
    assert manager.slot("c") == 0 and manager.keys[0][0, 0, 0, 0] == 3.0
    start, order = manager.arrange(["b"])
    assert (start, order) == (1, ["b"])
    manager.claim("d")
    start, order = manager.arrange(["d", "c"])  # not consecutive in that order: swapped into 0..1
    assert order == ["d", "c"] and manager.slot("d") == 0 and manager.keys[0][1, 0, 0, 0] == 3.0
    with pytest.raises(KVCacheExhausted):
        manager.step("c", 3)


def test_incremental_detokenizer_streams_the_same_text_as_one_decode():
    from ember.runtime.pipelines.tokenizer import TextTokenizer
    from ember.runtime.pipelines import default_model_path
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import tempfile
    from pathlib import Path
    from ember.runtime.pipelines.model_source import ModelSource
    from ember.runtime.pipelines.tokenizer import export_tokenizer
    source = ModelSource.resolve(None)
    directory = Path(tempfile.mkdtemp())
    export_tokenizer(source, directory, source.hf_config())
    tokenizer = TextTokenizer(directory)
    text = "Héllo wörld — naïve café 日本語のテキスト 🙂 done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = tokenizer.detokenizer()
    pieces = [stream.add([t]) for t in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # A stream cut inside a multi-byte character (a length limit) ends without a replacement character.
    for cut in range(1, len(ids)):
        stream = tokenizer.detokenizer()
        streamed = "".join([stream.add([t]) for t in ids[:cut]] + [stream.flush()])
        assert "\ufffd" not in streamed and text.startswith(streamed), (cut, streamed)
