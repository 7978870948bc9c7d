"""The built-in architecture table: one :class:`SupportedArchitecture` entry per Hugging Face class.

``PIPELINE_REGISTRY``, the registry of these entries that compiles on first use, lives with the compile cache
(``ember.runtime.compile_cache``), above this package: loading a compiled artifact through a registry of this
table imports none of the compiler."""
from __future__ import annotations

from ember.graphs.architectures import BERT, GEMMA2, LLAMA, PHI3, QWEN3
from ember.graphs.architectures.spec import ArchitectureSpec
from ember.graphs.nn.kv_cache import KVCacheStrategy

from .bert import BertPipelineModel
from .config import SupportedEncoding, WeightsFormat
from .decoder import DecoderPipelineModel
from .supported_architecture import PipelineTask, RopeType, SupportedArchitecture
from .tokenizer import TextTokenizer

# q4_1 / q4_k apply to GGUF files with Q4_1 / Q4_K blocks only (compile_cache.resolve_encoding checks); a GGUF's
# default encoding is its own block type where listed here.
_BOTH = [KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED]
# float16 / bfloat16 are GPU encodings: a target lists the encodings it compiles (`ember list`), and the registry
# offers an architecture's encodings only on the targets that have them.
_LLAMA_ENCODINGS = {SupportedEncoding.float32: list(_BOTH), SupportedEncoding.float16: list(_BOTH),
                    SupportedEncoding.bfloat16: list(_BOTH), SupportedEncoding.q8_0: list(_BOTH),
                    SupportedEncoding.q4_0: list(_BOTH), SupportedEncoding.q4_1: list(_BOTH),
                    SupportedEncoding.q4_k: list(_BOTH)}


def _llama_family(name: str, examples: list[str], weights_format: WeightsFormat,
                  spec: ArchitectureSpec = LLAMA) -> SupportedArchitecture:
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
        spec=spec,
    )


def _bert_family(name: str, examples: list[str]) -> SupportedArchitecture:
    return SupportedArchitecture(
        name=name,
        example_repo_ids=examples,
        default_encoding=SupportedEncoding.float32,
        supported_encodings={SupportedEncoding.float32: [], SupportedEncoding.float16: [],  # no KV cache
                             SupportedEncoding.bfloat16: [], SupportedEncoding.w8a8: []},
        pipeline_model=BertPipelineModel,
        task=PipelineTask.EMBEDDINGS_GENERATION,
        tokenizer=TextTokenizer,
        default_weights_format=WeightsFormat.safetensors,
        spec=BERT,
    )


BUILTIN_ARCHITECTURES = [
    _llama_family("LlamaForCausalLM", ["HuggingFaceTB/SmolLM2-135M-Instruct", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                                       "meta-llama/Llama-3.2-1B-Instruct"], WeightsFormat.gguf),
    _llama_family("MistralForCausalLM", ["mistralai/Mistral-7B-Instruct-v0.3"], WeightsFormat.safetensors),
    _llama_family("Qwen2ForCausalLM", ["Qwen/Qwen2.5-0.5B-Instruct"], WeightsFormat.safetensors),
    _llama_family("Qwen3ForCausalLM", ["Qwen/Qwen3-0.6B"], WeightsFormat.safetensors, QWEN3),
    _llama_family("Gemma2ForCausalLM", ["google/gemma-2-2b-it"], WeightsFormat.safetensors, GEMMA2),
    _llama_family("Phi3ForCausalLM", ["microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-4-mini-instruct"],
                  WeightsFormat.safetensors, PHI3),
    _bert_family("BertModel", ["sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-small-en-v1.5"]),
    _bert_family("BertForMaskedLM", ["google-bert/bert-base-uncased"]),
    _bert_family("BertForSequenceClassification", ["cross-encoder/ms-marco-MiniLM-L-6-v2"]),
    _bert_family("RobertaModel", ["sentence-transformers/all-distilroberta-v1"]),
    _bert_family("XLMRobertaModel", ["intfloat/multilingual-e5-small"]),
]
