"""The pipeline-model contract (``max.pipelines.pipeline`` in MAX): inputs, outputs, model, KV mixin."""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from ember.graphs.architectures import ArchitectureSpec, spec_for
from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy
from ember.graphs.nn.transformer import ReturnLogits

from ..session import Device, InferenceSession
from .config import PipelineConfig, upper_bounded_default
from .model_source import ModelSource
from .sampling import token_log_probabilities

_NON_TENSOR_FIELDS = ("kv_cache_inputs", "lora_ids", "lora_ranks", "hidden_states")


@dataclasses.dataclass(kw_only=True)
class ModelInputs:
    """Base of a model's inputs. Subclasses set tensor attributes (declared as dataclass fields, or assigned in
    their own ``__init__``); iterating yields the tensors in the order they were set.

    ``kv_cache_inputs``, ``lora_ids``, ``lora_ranks`` and ``hidden_states`` are optional extras that are
    not part of the iteration (``list(inputs) == [tokens, input_row_offsets]`` for such a subclass).
    """

    kv_cache_inputs: Any = None
    lora_ids: Any = None
    lora_ranks: Any = None
    hidden_states: Any = None

    def __iter__(self) -> Iterator[Any]:
        # The instance's own attributes, in assignment order: a dataclass sets its fields in declaration order,
        # a plain subclass in the order its __init__ assigns them (the base's defaults are class attributes).
        for name, value in vars(self).items():
            if name in _NON_TENSOR_FIELDS:
                continue
            if isinstance(value, np.ndarray) or hasattr(value, "data_ptr"):
                yield value


@dataclasses.dataclass
class ModelOutputs:
    """Logits for each row's next token, and for every position when the model returns them all."""

    next_token_logits: np.ndarray | None = None
    logits: np.ndarray | None = None


InputsT = TypeVar("InputsT", bound=ModelInputs)


class PipelineModel(abc.ABC, Generic[InputsT]):
    """A compiled model with its session, input preparation and execution; ``InputsT``: the inputs it prepares
    and executes (``DecoderInputs``, ``BertInputs``)."""

    def __init__(self, pipeline_config: PipelineConfig, session: InferenceSession, devices: Sequence[Device],
                 kv_cache_config: Any = None, weights: Any = None, adapter: Any = None,
                 return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN):
        self.pipeline_config = pipeline_config
        self.session = session
        self.devices = list(devices)
        self.kv_cache_config = kv_cache_config
        self.weights = weights
        self.adapter = adapter
        self.return_logits = ReturnLogits(return_logits)

    @classmethod
    def architecture_spec(cls, huggingface_config: Any) -> tuple[ArchitectureSpec, Any]:
        """The spec of the model's architecture and its typed config: where the sizing classmethods ask every
        fact (KV parameters, maximum positions, weight bytes) instead of re-deriving it."""
        name = (getattr(huggingface_config, "architectures", None) or [None])[0]
        spec = spec_for(name)
        if spec is None:
            raise ValueError(f"architecture {name!r} has no spec in ember.graphs.architectures")
        return spec, spec.config_from_hf(huggingface_config)

    @classmethod
    def calculate_max_seq_len(cls, pipeline_config: PipelineConfig, huggingface_config: Any) -> int:
        """The model's maximum sequence length; ``max_length`` may lower it, never raise it."""
        spec, config = cls.architecture_spec(huggingface_config)
        return upper_bounded_default(upper_bound=spec.max_positions(config), default=pipeline_config.max_length)

    @classmethod
    @abc.abstractmethod
    def get_kv_params(cls, huggingface_config: Any, pipeline_config: PipelineConfig) -> KVCacheParams | None:
        """Shape and type of the model's KV cache (None: the model keeps none)."""

    @classmethod
    def graph_options(cls, pipeline_config: PipelineConfig, source: Any) -> dict[str, Any]:
        """Model-specific ``CompileOptions`` fields (encoders: pooling); part of the compile-cache key."""
        return {}

    @classmethod
    def get_num_layers(cls, huggingface_config: Any) -> int:
        return huggingface_config.num_hidden_layers

    @classmethod
    def estimate_weights_size(cls, pipeline_config: PipelineConfig, huggingface_config: Any = None) -> int:
        """Bytes the weights take in the chosen encoding (float32 when none is chosen), from the spec."""
        hf = huggingface_config if huggingface_config is not None else cls._hf_config(pipeline_config)
        spec, config = cls.architecture_spec(hf)
        encoding = pipeline_config.encoding
        return spec.weight_bytes(config, str(getattr(encoding, "value", encoding or "float32")))

    @classmethod
    def _hf_config(cls, pipeline_config: PipelineConfig) -> Any:
        """The model's config when the caller passes none (MAX's classmethods take the pipeline config alone)."""
        return ModelSource.resolve(pipeline_config.model_path).hf_config()

    @abc.abstractmethod
    def load_model(self, session: InferenceSession):
        """Build the graph, compile it (or load the cached artifact) and load it into the session."""

    @abc.abstractmethod
    def prepare_initial_token_inputs(self, context_batch: Sequence[Any], kv_cache_inputs: Any = None,
                                     return_n_logits: int = 1) -> InputsT:
        """Batch the contexts' pending tokens and claim KV cache room for new contexts."""

    @abc.abstractmethod
    def prepare_next_token_inputs(self, next_tokens: np.ndarray, prev_model_inputs: InputsT) -> InputsT:
        """Inputs for the next decode step, from the tokens just sampled."""

    @abc.abstractmethod
    def execute(self, model_inputs: InputsT) -> ModelOutputs:
        """Run the compiled graph."""

    def compute_log_probabilities(self, model_inputs: ModelInputs | None, model_outputs: ModelOutputs,
                                  next_tokens: np.ndarray, batch_top_n: Sequence[int],
                                  batch_echo: Sequence[bool]) -> list[Any]:
        """Per row: the sampled token's log probability and the ``top_n`` alternatives (None where ``top_n`` is 0
        and ``echo`` is off). With ``echo``, also ``"prompt"``: one entry per token of the row's input (None for
        the first), each token's log probability under the logits of the position before it, with the ``top_n``
        alternatives; that needs every position's logits (``model_outputs.logits``, an artifact compiled with
        ``return_logits=ALL``) and the row's ``input_lengths``."""
        logits = model_outputs.next_token_logits
        if logits is None:
            raise ValueError("log probabilities need the model's next-token logits")
        results: list[Any] = []
        for row, (top_n, echo) in enumerate(zip(batch_top_n, batch_echo)):
            if top_n <= 0 and not echo:
                results.append(None)
                continue
            result = token_log_probabilities(logits[row], int(next_tokens[row]), top_n)
            if echo:
                result["prompt"] = self._echo(model_inputs, model_outputs, row, top_n)
            results.append(result)
        return results

    @staticmethod
    def _echo(model_inputs: Any, model_outputs: ModelOutputs, row: int, top_n: int) -> list[dict[str, Any] | None]:
        if model_outputs.logits is None or model_inputs is None:
            raise ValueError("echo needs the logits of every position: load an artifact compiled with "
                             "return_logits=ALL, or ask for the prompt's log probabilities with "
                             "SamplingParams.prompt_logprobs (computed while the prompt runs)")
        tokens = np.asarray(model_inputs.tokens)[row]
        length = int(np.asarray(model_inputs.input_lengths)[row])
        all_logits = model_outputs.logits[row]
        return [None] + [token_log_probabilities(all_logits[i - 1], int(tokens[i]), top_n) for i in range(1, length)]


class KVCacheMixin(abc.ABC):
    """KV cache sizing and manager creation for models that have a KV cache (next to :class:`PipelineModel`,
    whose classmethods answer the abstract ones here)."""

    @classmethod
    @abc.abstractmethod
    def get_kv_params(cls, huggingface_config: Any, pipeline_config: PipelineConfig) -> KVCacheParams:
        """Shape and type of the model's KV cache."""

    @classmethod
    @abc.abstractmethod
    def calculate_max_seq_len(cls, pipeline_config: PipelineConfig, huggingface_config: Any) -> int:
        """The model's maximum sequence length."""

    @classmethod
    @abc.abstractmethod
    def _hf_config(cls, pipeline_config: PipelineConfig) -> Any:
        """The model's config when the caller passes none."""

    @classmethod
    def estimate_kv_cache_size(cls, pipeline_config: PipelineConfig, available_cache_memory: int,
                               devices: Sequence[Device], huggingface_config: Any = None) -> int:
        """Bytes of KV cache to allocate: what the batch and length need, within memory and the user's cap."""
        hf = huggingface_config if huggingface_config is not None else cls._hf_config(pipeline_config)
        params = cls.get_kv_params(hf, pipeline_config)
        max_len = cls.calculate_max_seq_len(pipeline_config, hf)
        batch = pipeline_config.max_batch_size or cls.infer_optimal_batch_size(
            pipeline_config, available_cache_memory, huggingface_config=hf)
        wanted = batch * max_len * params.bytes_per_token
        if params.cache_strategy == KVCacheStrategy.PAGED:  # whole pages, plus the scratch page
            page_bytes = pipeline_config.kv_cache_page_size * params.bytes_per_token
            pages = batch * -(-max_len // pipeline_config.kv_cache_page_size) + 1
            if pipeline_config.kv_cache_pages is not None:
                pages = min(pages, pipeline_config.kv_cache_pages + 1)
            wanted = pages * page_bytes
        cap = min(available_cache_memory, pipeline_config.kv_cache_bytes or wanted)
        return int(min(wanted, cap))

    @classmethod
    def infer_optimal_batch_size(cls, pipeline_config: PipelineConfig, available_cache_memory: int,
                                 huggingface_config: Any = None) -> int:
        """The largest batch whose full-length KV cache fits the memory (and the user's cap), at least 1."""
        hf = huggingface_config if huggingface_config is not None else cls._hf_config(pipeline_config)
        params = cls.get_kv_params(hf, pipeline_config)
        max_len = cls.calculate_max_seq_len(pipeline_config, hf)
        per_sequence = max_len * params.bytes_per_token
        budget = min(available_cache_memory, pipeline_config.kv_cache_bytes or available_cache_memory)
        if params.cache_strategy == KVCacheStrategy.PAGED:
            page_size = pipeline_config.kv_cache_page_size
            pages_per_sequence = -(-max_len // page_size)
            per_sequence = pages_per_sequence * page_size * params.bytes_per_token
            if pipeline_config.kv_cache_pages is not None:
                budget = min(budget, pipeline_config.kv_cache_pages * page_size * params.bytes_per_token)
        return max(1, int(budget // per_sequence))

    @abc.abstractmethod
    def load_kv_manager(self, session: InferenceSession, available_cache_memory: int | None):
        """Create the KV cache manager(s) for the model."""
