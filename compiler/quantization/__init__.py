"""Weight quantization for the compiler: weights packed for onnxruntime's quantized contrib ops."""
from .matmul_nbits import (GGUF_TYPES, PackedWeight, dequantize, from_gguf_blocks, q4_1_split, q4_k_split,
                           quantize_rtn)

__all__ = ["GGUF_TYPES", "PackedWeight", "dequantize", "from_gguf_blocks", "q4_1_split", "q4_k_split",
           "quantize_rtn"]
