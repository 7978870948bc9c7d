"""The built-in architecture table: one :class:`SupportedArchitecture` entry per Hugging Face class."""
from __future__ import annotations

from ember.graphs.architectures import llama
from ember.graphs.nn.kv_cache import KVCacheStrategy

from .config import SupportedEncoding, WeightsFormat
from .decoder import DecoderPipelineModel
from .registry import PipelineRegistry, PipelineTask, RopeType, SupportedArchitecture
from .tokenizer import TextTokenizer

_LLAMA_ENCODINGS = {SupportedEncoding.float32: [KVCacheStrategy.CONTINUOUS]}


def _llama_family(name: str, examples: list[str], weights_format: WeightsFormat) -> SupportedArchitecture:
    return SupportedArchitecture(
        name=name,
        example_repo_ids=examples,
        default_encoding=SupportedEncoding.float32,
        supported_encodings=dict(_LLAMA_ENCODINGS),
        pipeline_model=DecoderPipelineModel,
        task=PipelineTask.TEXT_GENERATION,
        tokenizer=TextTokenizer,
        default_weights_format=weights_format,
        rope_type=RopeType.normal,
        weight_adapters={WeightsFormat.safetensors: llama.SAFETENSORS_RULES, WeightsFormat.gguf: llama.gguf_rules},
        graph_builder=llama.build_from_checkpoint,
    )


BUILTIN_ARCHITECTURES = [
    _llama_family("LlamaForCausalLM", ["HuggingFaceTB/SmolLM2-135M-Instruct", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                                       "meta-llama/Llama-3.2-1B-Instruct"], WeightsFormat.gguf),
    _llama_family("MistralForCausalLM", ["mistralai/Mistral-7B-Instruct-v0.3"], WeightsFormat.safetensors),
    _llama_family("Qwen2ForCausalLM", ["Qwen/Qwen2.5-0.5B-Instruct"], WeightsFormat.safetensors),
]

PIPELINE_REGISTRY = PipelineRegistry(BUILTIN_ARCHITECTURES)
