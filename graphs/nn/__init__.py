"""ember's layers: modules that own checkpoint weights and emit ONNX ops (``max.nn``'s shape)."""
from .attention import Attention
from .embedding import Embedding
from .encoder import Encoder
from .encoder_attention import EncoderSelfAttention, key_padding_bias
from .encoder_block import EncoderBlock
from .encoder_embeddings import EncoderEmbeddings
from .kv_cache import KVCacheParams, KVCacheStrategy
from .layer import Layer
from .linear import Linear, TiedOutput
from .mlp import MLP
from .norm import LayerNorm, RMSNorm
from .pooling import POOLING_MODES, l2_normalize, pool
from .rotary import RopeScaling, RotaryEmbedding
from .transformer import ReturnLogits, Transformer, TransformerBlock

__all__ = ["Attention", "Embedding", "KVCacheParams", "KVCacheStrategy", "Layer", "Linear", "TiedOutput", "MLP",
           "LayerNorm", "RMSNorm", "RopeScaling", "RotaryEmbedding", "ReturnLogits", "Transformer",
           "TransformerBlock", "Encoder", "EncoderBlock", "EncoderEmbeddings", "EncoderSelfAttention",
           "key_padding_bias", "POOLING_MODES", "pool", "l2_normalize"]
