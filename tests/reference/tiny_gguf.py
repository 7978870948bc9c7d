"""A tiny Llama GGUF written the way llama.cpp writes one: block-quantized matrices (chosen per tensor),
Q/K rows permuted for its rope kernel, F32 norms, tied embeddings. No tokenizer: tests drive it by ids.

The float weights are random; what a test compares against is the GGUF itself (its blocks dequantized
by the ``gguf`` package), so the quantization error of writing it does not matter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, LAYERS = 64, 4, 2, 96, 96, 2
HEAD_DIM = HIDDEN // HEADS

#: Per layer: GGML type of each matrix. Layer 1 mixes types inside the q|k|v group (not fusable as blocks).
DEFAULT_TYPES = (
    {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q4_1",
     "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q4_1"},
    {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q8_0",
     "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q4_1"},
)


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` Q/K permutation (ember's ``unpermute_rows`` undoes it)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def random_q4_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid Q4_K blocks (the gguf package cannot quantize to Q4_K): small positive d and dmin."""
    raw = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    for offset in (0, 2):
        raw[:, offset:offset + 2] = (rng.random(len(raw)) * 2e-3 + 1e-4).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, cols // 256 * 144)


def write_tiny_llama_gguf(path: Path, types=DEFAULT_TYPES, embedding_type: str = "Q8_0", seed: int = 0,
                          hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> Path:
    """The GGUF file; ``hidden`` / ``intermediate`` must be multiples of 256 for Q4_K matrices."""
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(seed)
    head_dim = hidden // HEADS
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)

    def add(name: str, array: np.ndarray, qtype: str) -> None:
        array = np.ascontiguousarray(array, np.float32)
        if qtype == "F32":
            writer.add_tensor(name, array)
            return
        if qtype == "Q4_K":  # random blocks of that shape (their values, not array's)
            blocks = random_q4_k(*array.shape, rng)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=T.Q4_K)
            return
        blocks = gguf.quants.quantize(array, T[qtype])
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=T[qtype])

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)).astype(np.float32) / np.sqrt(cols)

    add("token_embd.weight", rng.standard_normal((VOCAB, hidden)), embedding_type)
    for i, layer_types in enumerate(types):
        shapes = {"attn_q": (hidden, hidden), "attn_k": (KV_HEADS * head_dim, hidden),
                  "attn_v": (KV_HEADS * head_dim, hidden), "attn_output": (hidden, hidden),
                  "ffn_gate": (intermediate, hidden), "ffn_up": (intermediate, hidden),
                  "ffn_down": (hidden, intermediate)}
        add(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(hidden), "F32")
        add(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(hidden), "F32")
        for name, shape in shapes.items():
            w = matrix(*shape)
            if name == "attn_q":
                w = permute_rows(w, HEADS)
            elif name == "attn_k":
                w = permute_rows(w, KV_HEADS)
            add(f"blk.{i}.{name}.weight", w, layer_types[name])
    add("output_norm.weight", 1 + 0.1 * rng.standard_normal(hidden), "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
