"""Every valid shape compiles and runs: a fixed grid of tiny Llama / Mistral / Qwen2 checkpoints against transformers.

The grid covers every value the lowering issue lists at least once: ``head_dim`` 8, 12, 20, 24, 40, 64, 72, 80,
96, 128, 256 (GroupQueryAttention takes some with rotary in the kernel, some only with rotary before it, some not
at all); ``num_key_value_heads`` from 1 to ``num_attention_heads``; hidden and intermediate sizes that are not
multiples of 32; odd vocab sizes; sliding windows shorter and longer than the prompt. Each config runs with both
KV cache strategies in float32 (prompt + 16 greedy decode steps: logits within 1e-4 relative of transformers on
the same tokens, greedy tokens identical) and in one quantized encoding (the grid alternates q8_0 and q4_0, the
round-to-nearest encodings a safetensors checkpoint takes; q4_1 / q4_k keep a GGUF's own blocks and are swept on
GGUF files in ``test_gguf_block_encodings``). A quantized run is compared with transformers on the same
quantized weights (ember's round-to-nearest codes, dequantized into the torch model): what remains is the
kernel's int8 activations (accuracy level 4), so the logits stay within 5 % relative and the top token agrees
at >= 90 % of the positions. (Against the float model, a tiny random model's near-uniform logits flip at 4 bits
too often to say anything; ``ember verify`` measures that on real models.)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from ember.compiler.passes.lower_attention_gqa import EXTERNAL_ROTARY_FORM, GQA_FORM
from ember.compiler.passes.lower_cached_attention_explicit import FORM as EXPLICIT_FORM
from ember.compiler.quantization.matmul_nbits import dequantize, quantize_rtn
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits

from .decode_loop import decode_steps
from .tiny_models import save_tokenizer

RTOL = 1e-4
STEPS = 16
PROMPT = [1] + list(np.random.default_rng(5).integers(4, 150, 18))  # 19 tokens
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
QUANTIZED_RTOL, QUANTIZED_TOP1 = 0.05, 0.90
BITS = {"q8_0": 8, "q4_0": 4}


@dataclass(frozen=True)
class Shape:
    family: str
    head_dim: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    vocab: int
    encoding: str  # the quantized encoding this config also runs
    window: int = 0  # Mistral only

    @property
    def id(self) -> str:
        window = f"-w{self.window}" if self.window else ""
        return (f"{self.family}-hd{self.head_dim}-h{self.heads}kv{self.kv_heads}-d{self.hidden}-i{self.intermediate}"
                f"-v{self.vocab}{window}-{self.encoding}")


GRID = [
    Shape("llama", 8, 4, 1, 40, 72, 161, "q8_0"),
    Shape("llama", 12, 4, 2, 52, 100, 163, "q4_0"),  # head_dim % 8 != 0: no GroupQueryAttention at all
    Shape("mistral", 20, 3, 3, 60, 90, 167, "q8_0", window=5),  # window shorter than the prompt
    Shape("qwen2", 24, 4, 4, 72, 136, 171, "q4_0"),  # rotary in the kernel rejected (24 % 16)
    Shape("llama", 40, 2, 1, 80, 120, 173, "q8_0"),  # the crash
    Shape("mistral", 64, 2, 2, 100, 150, 179, "q4_0", window=64),  # window longer than the prompt
    Shape("qwen2", 72, 2, 1, 144, 200, 181, "q8_0"),
    Shape("llama", 80, 3, 1, 120, 170, 191, "q4_0"),
    Shape("mistral", 96, 2, 1, 130, 210, 193, "q8_0", window=9),
    Shape("llama", 128, 2, 2, 136, 250, 197, "q4_0"),
    Shape("qwen2", 256, 2, 1, 200, 300, 199, "q8_0"),
]


def make_checkpoint(shape: Shape, directory) -> torch.nn.Module:
    config_class, model_class = FAMILIES[shape.family]
    extra = {"sliding_window": shape.window} if shape.family == "mistral" else {}
    config = config_class(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                          num_hidden_layers=2, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                          head_dim=shape.head_dim, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, tie_word_embeddings=shape.vocab % 2 == 1 and shape.head_dim % 3 == 0,
                          **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(shape.head_dim)
    model = model_class(config).eval()
    with torch.no_grad():  # spread the logits so that argmax ties are rare
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    save_tokenizer(directory, shape.vocab)
    return model


@pytest.fixture(scope="module", params=GRID, ids=[s.id for s in GRID])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param.id)
    return request.param, directory, make_checkpoint(request.param, directory), tmp_path_factory.mktemp("cache")


def ember_run(directory, cache, encoding: str, strategy: str) -> tuple[list[int], np.ndarray, dict]:
    config = PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=1, max_length=64,
                            encoding=encoding, kv_cache_strategy=strategy, return_logits=ReturnLogits.ALL)
    pipeline = PIPELINE_REGISTRY.retrieve(config)[1]
    tokens, _, logits = decode_steps(pipeline, PROMPT, STEPS)
    return tokens, logits, pipeline.pipeline_model.artifact.manifest


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_float32_matches_transformers(checkpoint, strategy):
    shape, directory, hf_model, cache = checkpoint
    tokens, logits, manifest = ember_run(directory, cache, "float32", strategy)
    reference = hf_logits(hf_model, PROMPT + tokens)[:len(PROMPT) + STEPS - 1]
    rel = float(np.abs(logits - reference).max() / np.abs(reference).max())
    assert rel < RTOL, f"{shape.id} {strategy}: relative logit error {rel:.3g}"
    assert tokens == [int(t) for t in reference[len(PROMPT) - 1:].argmax(-1)], "greedy tokens differ"
    forms = {lowering["form"] for lowering in manifest["lowerings"]}
    assert len(manifest["lowerings"]) == 2 and all(forms), manifest["lowerings"]  # one record per layer
    if strategy == "continuous":  # the manifest says, per node, which form GroupQueryAttention's limits left
        expected = (EXPLICIT_FORM if shape.head_dim % 8 else EXTERNAL_ROTARY_FORM if shape.head_dim % 16
                    else GQA_FORM)
        for lowering in manifest["lowerings"]:
            assert lowering["form"] == expected, lowering
            assert (f"not {shape.head_dim}" in " ".join(lowering["rejected"])) == (expected != GQA_FORM), lowering


def with_quantized_weights(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """A copy of ``model`` whose Linear weights are ember's round-to-nearest codes, dequantized (the tied output
    head gets its own quantized copy: ember quantizes the head's product, not the embedding lookup)."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for module in quantized.modules():
            if isinstance(module, torch.nn.Linear):
                weight = dequantize(quantize_rtn(module.weight.numpy(), bits=bits))
                module.weight = torch.nn.Parameter(torch.from_numpy(weight))
    return quantized


def test_quantized_matches_transformers_on_the_same_codes(checkpoint):
    shape, directory, hf_model, cache = checkpoint
    strategy = "paged" if shape.head_dim % 16 else "continuous"
    tokens, logits, _ = ember_run(directory, cache, shape.encoding, strategy)
    reference = hf_logits(with_quantized_weights(hf_model, BITS[shape.encoding]), PROMPT + tokens)
    reference = reference[:len(PROMPT) + STEPS - 1]
    rel = float(np.abs(logits - reference).max() / np.abs(reference).max())
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    print(f"{shape.id} {strategy}: relative logit error {rel:.3g}, top-1 agreement {agreement:.2%}")
    assert rel < QUANTIZED_RTOL and agreement >= QUANTIZED_TOP1, (rel, agreement)
