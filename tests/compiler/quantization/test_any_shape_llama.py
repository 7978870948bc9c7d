"""Quantization of any shape end to end (issue 10): a tiny Llama whose every matrix has an odd shape, per encoding,
against a numpy reference of its quantized weights and against its float32 build.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from ember.compiler import CompileOptions
from ember.compiler.quantization import dequantize, quantize_rtn
from ember.compiler.targets import get_target
from ember.graphs.architectures.llama import SPEC
from ember.graphs.nn.transformer import ReturnLogits
from ember.graphs.weights import SafetensorsWeights

from .any_shape import assert_close, op_types, rng, set_accuracy_level

PROMPT_LENGTH, DECODE_STEPS = 12, 4


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    """A random tiny Llama (transformers, tied embeddings) with hidden 72, intermediate 100, vocab 161 and three
    query heads of 16 over one KV head: q|k|v is ``[72 -> 80]``, o ``[48 -> 72]``, gate|up ``[72 -> 200]``, down
    ``[100 -> 72]``, the tied head ``[72 -> 161]``; no K a multiple of 32 but o's 48 (not one either), no N of the
    head a multiple of 8. Returns the directory, the torch model, the prompt and the float32 build's greedy
    continuation with its logits at every position."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("odd-llama")
    config = LlamaConfig(vocab_size=161, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # as tiny_models does: logits spread, argmax ties rare
        for p in hf_model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    hf_model.save_pretrained(directory)
    hf_config = AutoConfig.from_pretrained(directory)
    prompt = [1] + [int(t) for t in rng(5).integers(3, 161, PROMPT_LENGTH - 1)]
    tokens: list[int] = []
    float_model = lowered_llama(hf_config, directory, "float32")
    for _ in range(DECODE_STEPS):  # the float32 build's greedy tokens, forced on every build below
        tokens.append(int(generate(float_model, prompt, tokens)[-1].argmax()))
    return hf_config, directory, hf_model, prompt, tokens, generate(float_model, prompt, tokens)


def lowered_llama(hf_config, directory: Path, encoding: str) -> ir.Model:
    graph = SPEC.build(hf_config, SafetensorsWeights(directory), "safetensors",
                       CompileOptions(return_logits=ReturnLogits.ALL).graph_options())
    return get_target("ort-cpu").lower(graph, encoding)


def generate(model: ir.Model, prompt: list[int], forced: list[int]) -> np.ndarray:
    """Prefill ``prompt``, then one decode step per ``forced`` token through the KV cache; the logits of every
    position ``[len(prompt) + len(forced), vocab]``."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    caches = {v.name: np.zeros((1, int(v.shape[1]), 32, int(v.shape[3])), np.float32)  # [batch, kv, length, dim]
              for v in model.graph.inputs if v.name.startswith("past_key_values.")}

    def step(tokens: list[int], cached: int) -> np.ndarray:
        feeds = {"input_ids": np.array([tokens], np.int64), "input_lengths": np.array([len(tokens)], np.int32),
                 "cache_lengths": np.array([cached], np.int32), **caches}
        outputs = dict(zip(names, session.run(None, feeds)))
        caches.update({name: outputs[name.replace("past_key_values.", "present.")] for name in caches})
        return outputs["logits"][0]

    logits = [step(prompt, 0)]
    for i, token in enumerate(forced):
        logits.append(step([token], len(prompt) + i))
    return np.concatenate(logits)


ENCODINGS = {"q8_0": (8, True), "q4_0": (4, True), "q4_1": (4, False)}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_tiny_llama_computes_with_its_quantized_weights(odd_llama, encoding):
    """The compiled model (prefill and decode steps) against transformers running the same weights quantized in
    numpy, matrix by matrix (``quantize_rtn`` of each checkpoint weight, before any fusion; the token lookup
    float, the tied head quantized): within float32 rounding at accuracy level 0, so every odd-shaped matrix,
    fused or not, is quantized and padded exactly. At the target's level 4, activations rounded to int8 move
    the logits by up to 2 % of their range (measured 1.2-1.8 %), which flips a near tie of random logits at
    one of the 16 positions: top-1 agreement >= 0.9, error <= 3 %."""
    import torch

    hf_config, directory, hf_model, prompt, tokens, _ = odd_llama
    bits, symmetric = ENCODINGS[encoding]
    model = lowered_llama(hf_config, directory, encoding)
    assert "MatMul" not in op_types(model) and "Gemm" not in op_types(model)
    level4 = generate(model, prompt, tokens)
    set_accuracy_level(model, 0)
    ours = generate(model, prompt, tokens)

    reference_model = type(hf_model)(hf_model.config).eval()
    reference_model.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        for module in reference_model.modules():
            if isinstance(module, torch.nn.Linear):  # lm_head too: a new Parameter unties it from the lookup
                w = module.weight.detach().numpy()
                module.weight = torch.nn.Parameter(torch.from_numpy(
                    dequantize(quantize_rtn(w, bits, 32, symmetric=symmetric))))
        reference = reference_model(torch.tensor([prompt + tokens])).logits[0].numpy()
    assert reference_model.lm_head.weight.data_ptr() != reference_model.model.embed_tokens.weight.data_ptr()
    assert_close(ours, reference, 1e-5)
    agreement = float((level4.argmax(-1) == reference.argmax(-1)).mean())
    error4 = float(np.abs(level4 - reference).max() / np.abs(reference).max())
    print(f"{encoding} at accuracy level 4, against the same quantized weights: top-1 agreement {agreement:.3f}, "
          f"max relative logit error {error4:.3g}")
    assert agreement >= 0.9
    assert_close(level4, reference, 3e-2)


#: Bounds against the float32 build (16 positions, the target's accuracy level 4), from measurement: random
#: weights quantized to 4 bits put 16-36 % of the logits' range into error, and 161 random logits lie close, so
#: top-1 agreement with float32 measured 0.44-0.94 and min cosine 0.91-0.98 over six random models -- the same
#: for aligned shapes (hidden 64, intermediate 96, vocab 160) as for these, so the odd shapes cost nothing (this
#: model: q4_0 0.20 / 0.69 / 0.967, q4_1 0.16 / 0.81 / 0.977). 8 bits: error 1.8-2.9 %, agreement 0.94-1.0,
#: cosine >= 0.9992 for both shape sets (this model: 0.021 / 1.0 / 0.9997). Exactness is the test above's.
CLOSE_TO_FLOAT = {"q8_0": (4e-2, 0.9, 0.999), "q4_0": (0.4, 0.5, 0.9), "q4_1": (0.4, 0.5, 0.9)}


@pytest.mark.parametrize("encoding", list(CLOSE_TO_FLOAT))
def test_tiny_llama_stays_close_to_float32(odd_llama, encoding):
    """Compiled with the target's passes and run (prefill + decode steps), the quantized model's logits stay as
    close to the float32 build's as quantization on aligned shapes does (bounds: ``CLOSE_TO_FLOAT``)."""
    hf_config, directory, _, prompt, tokens, reference = odd_llama
    ours = generate(lowered_llama(hf_config, directory, encoding), prompt, tokens)
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    agreement = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    print(f"{encoding}: max relative logit error {error:.3g}, top-1 agreement {agreement:.3f}, "
          f"min cosine {cosine.min():.4f}")
    max_error, min_agreement, min_cosine = CLOSE_TO_FLOAT[encoding]
    assert error < max_error and agreement >= min_agreement and cosine.min() > min_cosine

