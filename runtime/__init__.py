"""ember's runtime: sessions over compiled artifacts, KV caches, pipelines (numpy + onnxruntime, no torch)."""
from .session import CPU, Device, InferenceSession

__all__ = ["CPU", "Device", "InferenceSession"]
