"""``DistributedTransformerBlock`` and ``DistributedTransformer``: a decoder split over ranks (MAX's names,
Megatron-LM's split), one graph per rank.

A block's attention is split by heads: each rank projects q, k and v for its heads (column-parallel), attends over
its own KV cache (the cache is sharded by KV heads), and multiplies its heads' slice of o_proj (row-parallel,
all-reduced). With fewer KV heads than ranks, the ranks whose query heads share a KV head each hold a copy of it. The
MLP splits its intermediate features (gate and up column-parallel, down row-parallel, all-reduced). Norms and the
residual stream are replicated. The embedding and the output head split the vocabulary (an all-reduce after the
lookup, an all-gather of the logits). Two all-reduces per block, as in Megatron.

Head counts that do not divide are refused when the graph is built (at compile time), naming the counts: padding
heads would change the KV cache layout every rank shares.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir

from ..attention import Attention
from ..embedding import Embedding
from ..kv_cache import KVCacheParams
from ..linear import Linear, Projection, TiedOutput
from ..mlp import MLP
from ..norm import RMSNorm
from ..rotary import RotaryEmbedding
from ..transformer import ReturnLogits, Transformer, TransformerBlock
from .parallel_linear import ColumnParallelLinear, RowParallelLinear
from .sharding import DeviceRef, distribute_value
from .vocab_parallel import VocabParallelEmbedding
from ...weights.adapter import WeightRef


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """The query heads and KV heads each rank attends with (whole heads, in order)."""

    query: list[range]
    kv: list[range]

    @classmethod
    def of(cls, num_heads: int, num_kv_heads: int, world: int) -> "HeadSplit":
        """Query heads split evenly; KV heads split evenly, or (fewer KV heads than ranks, ranks a multiple of
        them) one copied KV head per rank, the one its query heads read. Anything else is a ValueError naming
        the counts."""
        if num_heads % world:
            raise ValueError(f"tensor parallelism over {world} ranks: the model's {num_heads} attention heads do not "
                             f"divide into {world} equal parts; use a number of ranks that divides {num_heads}")
        per_rank = num_heads // world
        query = [range(r * per_rank, (r + 1) * per_rank) for r in range(world)]
        if num_kv_heads % world == 0:
            kv_per_rank = num_kv_heads // world
            kv = [range(r * kv_per_rank, (r + 1) * kv_per_rank) for r in range(world)]
        elif world % num_kv_heads == 0:
            group = num_heads // num_kv_heads  # query heads per KV head: a rank's heads lie in one group
            kv = [range(q.start // group, q.start // group + 1) for q in query]
        else:
            raise ValueError(f"tensor parallelism over {world} ranks: the model's {num_kv_heads} KV heads neither "
                             f"divide into {world} parts nor can be copied to them ({world} is not a multiple of "
                             f"{num_kv_heads}); use a number of ranks that divides or is a multiple of "
                             f"{num_kv_heads}")
        return cls(query, kv)


def _feature_ranges(heads: list[range], head_dim: int) -> list[range]:
    return [range(h.start * head_dim, h.stop * head_dim) for h in heads]


def _linear_parts(layer: Projection) -> tuple[str, WeightRef, WeightRef | None]:
    """A single-device layer's weights, to be split (a layer already split, or of another kind, cannot be)."""
    if not isinstance(layer, Linear):
        raise TypeError(f"{layer.name}: tensor parallelism splits a Linear layer, not a {type(layer).__name__}")
    return layer.name, layer.weight_ref, layer.bias_ref


def shard_attention(attention: Attention, devices: Sequence[DeviceRef]) -> list[Attention]:
    """One :class:`Attention` per rank over its heads (module docstring); q/k norms are per head, so replicated."""
    world = len(devices)
    split = HeadSplit.of(attention.num_heads, attention.num_kv_heads, world)
    hd = attention.head_dim
    q = ColumnParallelLinear(*_linear_parts(attention.q_proj)).shard(devices, _feature_ranges(split.query, hd))
    k = ColumnParallelLinear(*_linear_parts(attention.k_proj)).shard(devices, _feature_ranges(split.kv, hd))
    v = ColumnParallelLinear(*_linear_parts(attention.v_proj)).shard(devices, _feature_ranges(split.kv, hd))
    o = RowParallelLinear(*_linear_parts(attention.o_proj)).shard(devices, _feature_ranges(split.query, hd))
    return [Attention(attention.name, q[r], k[r], v[r], o[r], num_heads=len(split.query[r]),
                      num_kv_heads=len(split.kv[r]), head_dim=hd, rope=attention.rope,
                      sliding_window=attention.sliding_window, scale=attention.scale, softcap=attention.softcap,
                      q_norm=attention.q_norm, k_norm=attention.k_norm) for r in range(world)]


def shard_mlp(mlp: MLP, devices: Sequence[DeviceRef]) -> list[MLP]:
    """One gated MLP per rank over its slice of the intermediate features (they need not divide evenly)."""
    gate = ColumnParallelLinear(*_linear_parts(mlp.gate_proj)).shard(devices)
    up = ColumnParallelLinear(*_linear_parts(mlp.up_proj)).shard(devices)
    ranges, start = [], 0
    for shard in gate:  # down takes the same intermediate features as its rank's gate and up
        width = shard.weight_ref.shape[0]
        ranges.append(range(start, start + width))
        start += width
    down = RowParallelLinear(*_linear_parts(mlp.down_proj)).shard(devices, ranges)
    return [MLP(mlp.name, gate[r], up[r], down[r], mlp.activation_name) for r in range(len(devices))]


class DistributedTransformerBlock:
    """Attention, MLP and norms of one block, sharded over ``devices`` with the all-reduces they need (module
    docstring). ``shard(devices)`` (or indexing by rank) gives each rank's :class:`TransformerBlock`."""

    def __init__(self, attention: Attention, mlp: MLP, attention_norm: RMSNorm, mlp_norm: RMSNorm,
                 devices: Sequence[DeviceRef], attention_output_norm: RMSNorm | None = None,
                 mlp_output_norm: RMSNorm | None = None, name: str | None = None):
        self.devices = list(devices)
        self.name = name or attention.name.rsplit(".", 1)[0]
        attentions = shard_attention(attention, self.devices)
        mlps = shard_mlp(mlp, self.devices)
        norms = zip(*(distribute_value(n, self.devices) for n in
                      (attention_norm, mlp_norm, attention_output_norm, mlp_output_norm)))
        self.rank_blocks = [TransformerBlock(self.name, a, m, *n) for a, m, n in zip(attentions, mlps, norms)]

    @classmethod
    def from_block(cls, block: TransformerBlock, devices: Sequence[DeviceRef]) -> "DistributedTransformerBlock":
        return cls(block.self_attn, block.mlp, block.attention_norm, block.mlp_norm, devices,
                   block.attention_output_norm, block.mlp_output_norm, name=block.name)

    def shard(self, devices: Sequence[DeviceRef]) -> list[TransformerBlock]:
        if len(devices) != len(self.devices):
            raise ValueError(f"{self.name} is sharded over {len(self.devices)} devices, not {len(devices)}: build "
                             f"it again from the checkpoint's block")
        return list(self.rank_blocks)

    def __getitem__(self, rank: int) -> TransformerBlock:
        return self.rank_blocks[rank]


class DistributedTransformer:
    """A decoder whose blocks run tensor-parallel over ``devices`` (``max.nn``'s ``DistributedTransformer``); built
    one rank at a time (:meth:`build`), each rank's graph the single-device decoder's interface with its share of
    the KV heads (``kv_params.n_kv_heads`` is the whole model's; :meth:`rank_kv_params` a rank's)."""

    def __init__(self, dim: int, n_heads: int, layers: Sequence[DistributedTransformerBlock], norm: RMSNorm,
                 output: ColumnParallelLinear, embedding: VocabParallelEmbedding, kv_params: KVCacheParams,
                 devices: Sequence[DeviceRef], rope: RotaryEmbedding | None,
                 return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN, use_subgraphs: bool = False,
                 subgraph_layer_groups: Sequence[Sequence[int]] | None = None, logit_softcap: float = 0.0):
        self.dim, self.n_heads = dim, n_heads
        self.layers = list(layers)
        self.norm, self.output, self.embedding = norm, output, embedding
        self.kv_params, self.devices, self.rope = kv_params, list(devices), rope
        self.return_logits = ReturnLogits(return_logits)
        self.use_subgraphs, self.subgraph_layer_groups = use_subgraphs, subgraph_layer_groups
        self.logit_softcap = logit_softcap
        if not output.gather_output:
            raise ValueError("the output head of a DistributedTransformer gathers its logits (gather_output=True)")
        self._embeddings = embedding.shard(self.devices)
        self._outputs = output.shard(self.devices)

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def rank_kv_params(self, rank: int) -> KVCacheParams:
        """The KV cache of one rank: its KV heads only (every rank has as many)."""
        if not self.layers:
            return self.kv_params
        return dataclasses.replace(self.kv_params, n_kv_heads=self.layers[0][rank].self_attn.num_kv_heads)

    def rank_transformer(self, rank: int) -> Transformer:
        """The single-device decoder that is rank ``rank``'s part (its graph has the collectives)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not one of the {self.world_size} ranks")
        return Transformer(self.dim, self.n_heads, [block[rank] for block in self.layers], self.norm,
                           self._outputs[rank], self._embeddings[rank], self.rank_kv_params(rank), self.rope,
                           self.return_logits, self.logit_softcap, use_subgraphs=self.use_subgraphs,
                           subgraph_layer_groups=self.subgraph_layer_groups)

    def build(self, rank: int, name: str = "model") -> ir.Model:
        """Rank ``rank``'s graph; its metadata says which rank of how many (``ember.tensor_parallel``)."""
        model = self.rank_transformer(rank).build(name)
        model.graph.metadata_props["ember.tensor_parallel"] = f"{rank}/{self.world_size}"
        return model


def distribute_transformer(transformer: Transformer, devices: Sequence[DeviceRef]) -> DistributedTransformer:
    """The tensor-parallel form of a single-device decoder built from a checkpoint (the architectures' builders
    make a :class:`Transformer`; this splits its layers over ``devices``)."""
    embedding = transformer.embedding
    if not isinstance(embedding, Embedding):
        raise TypeError(f"cannot split a {type(embedding).__name__} embedding by vocabulary")
    output = transformer.output
    if isinstance(output, TiedOutput):
        head = ColumnParallelLinear(output.name, output.table, gather_output=True, tied=True)
    else:
        head = ColumnParallelLinear(*_linear_parts(output), gather_output=True)
    return DistributedTransformer(
        transformer.dim, transformer.n_heads,
        [DistributedTransformerBlock.from_block(block, devices) for block in transformer.layers], transformer.norm,
        head, VocabParallelEmbedding(embedding.name, embedding.table, embedding.scale), transformer.kv_params,
        devices, transformer.rope, transformer.return_logits, transformer.use_subgraphs,
        transformer.subgraph_layer_groups, transformer.logit_softcap)
