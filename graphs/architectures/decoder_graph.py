"""A decoder's graph from its layers, as the options ask: one device, or one rank of a tensor-parallel split.

Every decoder family builds a :class:`~ember.graphs.nn.transformer.Transformer` from its checkpoint; this is where
``GraphOptions.tensor_parallel`` turns it into rank ``GraphOptions.rank``'s graph (``graphs/nn/distributed/``) and
``use_subgraphs`` asks for its blocks as ONNX functions, so that no family repeats either.
"""
from __future__ import annotations

import onnx_ir as ir

from ..nn.distributed import cpu_devices, distribute_transformer
from ..nn.transformer import Transformer
from ..options import GraphOptions


def build_decoder_graph(transformer: Transformer, options: GraphOptions, name: str) -> ir.Model:
    """``transformer``'s graph, or its rank's part of it over ``options.tensor_parallel`` ranks."""
    transformer.use_subgraphs = options.use_subgraphs
    if options.tensor_parallel == 1:
        return transformer.build(name)
    return distribute_transformer(transformer, cpu_devices(options.tensor_parallel)).build(options.rank, name)
