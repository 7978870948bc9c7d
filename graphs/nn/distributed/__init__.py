"""Tensor parallelism in the graph: sharded layers with MAX's names (``max.nn.transformer.distributed_transformer``)
and Megatron-LM's meaning, one graph per rank with ``ember.AllReduce`` / ``ember.AllGather`` where ranks meet."""
from .parallel_linear import ColumnParallelLinear, ColumnShard, RowParallelLinear, RowShard
from .sharding import (DeviceRef, ShardableCallable, column_slice, cpu_devices, distribute_value, even_ranges,
                       forward_sharded_layers, padded_ranges, row_slice, take)
from .transformer import (DistributedTransformer, DistributedTransformerBlock, HeadSplit, distribute_transformer,
                          shard_attention, shard_mlp)
from .vocab_parallel import VocabParallelEmbedding, VocabShard

__all__ = ["ColumnParallelLinear", "ColumnShard", "DeviceRef", "DistributedTransformer", "DistributedTransformerBlock",
           "HeadSplit", "RowParallelLinear", "RowShard", "ShardableCallable", "VocabParallelEmbedding", "VocabShard",
           "column_slice", "cpu_devices", "distribute_transformer", "distribute_value", "even_ranges",
           "forward_sharded_layers", "padded_ranges", "row_slice", "shard_attention", "shard_mlp", "take"]
