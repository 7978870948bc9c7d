"""The int8 KV cache (``kv_cache_bit_width=8``) end to end on tiny random checkpoints, against the same model
with a float KV cache (both ember, same weights; the float one is checked against transformers elsewhere).

Logits are compared along the same tokens (the float model's greedy ones), prompt and 16 decode steps: within
2e-2 of the largest logit for the Llama (measured 1.2-1.3e-2; int8 steps are 1.2 % of each channel's range,
and 3 random layers pass the error on), 2.5e-2 for the other variants (measured 1.1-1.9e-2). The Llama's
greedy tokens are identical for 16 steps; on the other random variants near-tied logits can flip a token.
The buffers are int8, and their size and the KV memory estimates count 1 byte per element.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits, SamplingParams

from .tiny_models import VARIANTS, VOCAB, make_model

PROMPTS = [[1] + list(np.random.default_rng(s).integers(4, VOCAB, n)) for s, n in ((1, 19), (2, 4), (3, 12))]
TOLERANCE = {"llama-gqa-llama3": 2e-2}
STEPS = 16


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_model(request.param, directory)
    cache = tmp_path_factory.mktemp(f"{request.param}-cache")

    def pipeline(bits: int, **kwargs):
        config = PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=2, kv_cache_bit_width=bits,
                                **kwargs)
        return PIPELINE_REGISTRY.retrieve(config)[1]

    return request.param, pipeline


def run(pipe, prompt, forced: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Logits of the prompt and of STEPS decode steps, feeding ``forced`` tokens (else its own greedy ones)."""
    model = pipe.pipeline_model
    ctx = pipe.new_context(prompt)
    inputs = model.prepare_initial_token_inputs([ctx])
    out = model.execute(inputs)
    logits, tokens = [out.logits[0, :len(prompt)]], []
    for step in range(STEPS):
        token = int(np.argmax(out.next_token_logits[0])) if forced is None else forced[step]
        tokens.append(token)
        ctx.start_idx = ctx.active_idx
        ctx.append(token)
        inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
        out = model.execute(inputs)
        logits.append(out.next_token_logits)
    model.release(ctx.request_id)
    return np.concatenate(logits), tokens


def test_int8_kv_logits_stay_close_to_float_kv(variant):
    name, pipeline = variant
    float_kv, int8_kv = pipeline(0, return_logits=ReturnLogits.ALL), pipeline(8, return_logits=ReturnLogits.ALL)
    errors = []
    for prompt in PROMPTS:
        reference, greedy = run(float_kv, prompt)
        ours, _ = run(int8_kv, prompt, forced=greedy)
        errors.append(float(np.abs(ours - reference).max() / np.abs(reference).max()))
        if name == "llama-gqa-llama3":
            assert run(int8_kv, prompt)[1] == greedy
    print(f"{name}: int8 KV vs float KV, max relative logit error per prompt {np.round(errors, 4).tolist()}")
    assert max(errors) < TOLERANCE.get(name, 2.5e-2)
    assert int8_kv.pipeline_model.kv_manager.num_active == 0


def test_kv_buffers_are_int8_and_counted_at_one_byte(variant):
    name, pipeline = variant
    pipe = pipeline(8)
    model = pipe.pipeline_model
    manifest = model.artifact.manifest
    kv = manifest["kv_params"]
    assert kv["dtype"] == "int8" and manifest["options"]["kv_cache_bit_width"] == 8
    assert manifest["kv_cache_quantization"]["bit_width"] == 8
    assert {v["dtype"] for v in manifest["graph"]["inputs"] if v["name"].startswith("past_key_values.")} == {"INT8"}
    manager = model.kv_manager
    elements = manager.max_batch_size * kv["n_kv_heads"] * manager.max_seq_len * kv["head_dim"]
    assert all(b.dtype == np.int8 for b in manager.keys + manager.values)
    assert manager.nbytes == 2 * kv["num_layers"] * elements  # one byte per element
    assert manager.bytes_per_slot * manager.max_batch_size == manager.nbytes
    float_manager = pipeline(0).pipeline_model.kv_manager
    assert float_manager.keys[0].dtype == np.float32 and float_manager.nbytes == 4 * manager.nbytes

    estimates = [type(model).estimate_kv_cache_size(PipelineConfig(model_path=model.pipeline_config.model_path,
                                                                  max_batch_size=2, kv_cache_bit_width=bits), 2**40, [])
                 for bits in (8, 0)]
    per_token = 2 * kv["num_layers"] * kv["n_kv_heads"] * kv["head_dim"]  # K and V elements, every layer
    assert estimates == [2 * 256 * per_token, 4 * 2 * 256 * per_token]  # batch 2, 256 positions


def test_batch_of_two_matches_each_alone(variant):
    name, pipeline = variant
    pipe = pipeline(8)
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [pipe.generate_tokens([p], sampling)[0] for p in PROMPTS[:2]]
    assert pipe.generate_tokens(PROMPTS[:2], sampling) == alone
    assert pipe.pipeline_model.kv_manager.num_active == 0


def test_unsupported_bit_widths_and_models_are_clear_errors(tmp_path):
    from ember.runtime.pipelines import ModelSource
    from ember.runtime.compile_cache import compile_options

    from ..graphs.bert.tiny_encoders import make_model as make_encoder

    llama = tmp_path / "llama"
    make_model("llama-gqa-llama3", llama)
    with pytest.raises(ValueError, match="does not support a 4-bit KV cache; supported kv_cache_bit_width: 0, 8"):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=llama, cache_dir=tmp_path / "c", kv_cache_bit_width=4))
    with pytest.raises(ValueError, match="needs the continuous KV cache strategy"):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=llama, cache_dir=tmp_path / "c", kv_cache_bit_width=8,
                                                  kv_cache_strategy="paged"))
    with pytest.raises(ValueError, match="kv_cache_bit_width must be 0"):
        PipelineConfig(kv_cache_bit_width=-8)
    encoder = tmp_path / "bert"
    make_encoder("bert", encoder)
    source = ModelSource.resolve(encoder)
    with pytest.raises(ValueError, match="BertModel has no KV cache: kv_cache_bit_width applies to text-generation"):
        compile_options(PipelineConfig(model_path=encoder, kv_cache_bit_width=8),
                        PIPELINE_REGISTRY.architectures["BertModel"], source)
