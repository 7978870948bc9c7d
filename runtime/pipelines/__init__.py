"""ember's pipeline layer (``max.pipelines``' public names)."""
from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy
from ember.graphs.nn.transformer import ReturnLogits

from .architectures import BUILTIN_ARCHITECTURES, PIPELINE_REGISTRY
from .bert import BertInputs, BertModelConfig, BertPipelineModel
from .config import PipelineConfig, SupportedEncoding, WeightsFormat, upper_bounded_default
from .context import FinishReason, SamplingParams, TextContext
from .decoder import DecoderInputs, DecoderPipelineModel
from .embeddings import EmbeddingsContext, EmbeddingsPipeline, EmbeddingsResponse
from .interfaces import KVCacheMixin, ModelInputs, ModelOutputs, PipelineModel
from .model_source import ModelSource, default_embeddings_model_path, default_model_path
from .model_store import ModelFetchError
from .pooling_config import PoolingConfig
from .registry import PipelineRegistry, PipelineTask, RopeType, SupportedArchitecture, get_pipeline_for_task
from .text_generation import TextGenerationPipeline, TextResponse
from .tokenizer import TextTokenizer

__all__ = [
    "BertInputs", "BertModelConfig", "BertPipelineModel", "EmbeddingsContext", "EmbeddingsPipeline",
    "EmbeddingsResponse", "default_embeddings_model_path", "PoolingConfig",
    "BUILTIN_ARCHITECTURES", "PIPELINE_REGISTRY", "DecoderInputs", "DecoderPipelineModel", "FinishReason",
    "KVCacheMixin", "KVCacheParams", "KVCacheStrategy", "ModelFetchError", "ModelInputs", "ModelOutputs", "ModelSource",
    "PipelineConfig", "PipelineModel", "PipelineRegistry", "PipelineTask", "ReturnLogits", "RopeType",
    "SamplingParams", "SupportedArchitecture", "SupportedEncoding", "TextContext", "TextGenerationPipeline",
    "TextResponse", "TextTokenizer", "WeightsFormat", "default_model_path", "get_pipeline_for_task",
    "upper_bounded_default",
]
