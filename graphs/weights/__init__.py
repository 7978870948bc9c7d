"""Checkpoint readers (safetensors, GGUF) and the name adapters architectures use."""
from .adapter import AdaptedWeights, WeightRef, WeightRule
from .safetensors import SafetensorsWeights
from .source import WeightSource

__all__ = ["AdaptedWeights", "WeightRef", "WeightRule", "SafetensorsWeights", "WeightSource"]
