"""ember's layers: modules that own checkpoint weights and emit ONNX ops (``max.nn``'s shape)."""
from .attention import Attention
from .embedding import Embedding
from .kv_cache import KVCacheParams, KVCacheStrategy
from .layer import Layer
from .linear import Linear, TiedOutput
from .mlp import MLP
from .norm import LayerNorm, RMSNorm
from .rotary import RopeScaling, RotaryEmbedding
from .transformer import ReturnLogits, Transformer, TransformerBlock

__all__ = ["Attention", "Embedding", "KVCacheParams", "KVCacheStrategy", "Layer", "Linear", "TiedOutput", "MLP",
           "LayerNorm", "RMSNorm", "RopeScaling", "RotaryEmbedding", "ReturnLogits", "Transformer",
           "TransformerBlock"]
