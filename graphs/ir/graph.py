"""The graph under construction: a context that every op function appends to (like ``max.graph.Graph``).

ember builds graphs directly with ``onnx_ir`` rather than tracing PyTorch. A :class:`Graph` owns the
inputs, nodes, initializers and outputs; while it is the active context (``with Graph(...) as g:``) the
typed op functions in :mod:`ember.graphs.ir.ops` add nodes to it. Node names follow the checkpoint's
module path (``/model/layers.3/self_attn/q_proj/MatMul``) through :meth:`Graph.scope`, so a node can be
traced to its weight.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from .versions import IR_VERSION, OPSET_IMPORTS

#: ``ir.Value.meta`` key of a weight's checkpoint-quantized blocks (not serialized).
BLOCKS_META = "ember.quantized_blocks"
#: ``ir.Value.meta`` key set on a token-embedding table (the one quantization may turn into a quantized lookup).
TOKEN_EMBEDDING_META = "ember.token_embedding"

_ACTIVE: list["Graph"] = []

Dim = int | str | None


def current_graph() -> "Graph":
    """The graph that op functions append to; an error outside ``with Graph(...)``."""
    if not _ACTIVE:
        raise RuntimeError("no active ember graph: build inside `with Graph(name) as g:`")
    return _ACTIVE[-1]


def to_ir_shape(dims: Sequence[Dim] | None) -> ir.Shape | None:
    return None if dims is None else ir.Shape(list(dims))


class Graph:
    """An ONNX graph being built, with named scopes and lazily loaded weights."""

    def __init__(self, name: str, opset_imports: dict[str, int] | None = None):
        self.name = name
        self.opset_imports = dict(opset_imports or OPSET_IMPORTS)
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}
        self._scopes: list[str] = []
        self._node_names: Counter[str] = Counter()
        self._value_names: Counter[str] = Counter()
        self.metadata: dict[str, str] = {}

    # context ------------------------------------------------------------------------------------
    def __enter__(self) -> "Graph":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)

    @contextlib.contextmanager
    def scope(self, module_path: str) -> Iterator[None]:
        """Name the nodes made inside after a module: ``model.layers.3.mlp`` -> ``/model/layers.3/mlp/...``."""
        saved = self._scopes
        parts: list[str] = []
        for part in module_path.split("."):
            if part.isdigit() and parts:
                parts[-1] = f"{parts[-1]}.{part}"
            else:
                parts.append(part)
        self._scopes = parts
        try:
            yield
        finally:
            self._scopes = saved

    @property
    def scope_path(self) -> str:
        return "/" + "/".join(self._scopes) if self._scopes else ""

    def _unique(self, counter: Counter[str], base: str) -> str:
        counter[base] += 1
        return base if counter[base] == 1 else f"{base}_{counter[base] - 1}"

    # values -------------------------------------------------------------------------------------
    def add_input(self, name: str, dtype: ir.DataType, shape: Sequence[Dim]) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=to_ir_shape(shape))
        self.inputs.append(value)
        return value

    def add_output(self, value: ir.Value, name: str) -> ir.Value:
        """Mark ``value`` as a graph output under ``name`` (renaming it)."""
        value.name = name
        self.outputs.append(value)
        return value

    def add_weight(self, name: str, dtype: ir.DataType, shape: Sequence[int],
                   load: Callable[[], np.ndarray], blocks: Any = None) -> ir.Value:
        """An initializer whose data is produced by ``load`` only when the model is serialized.

        The same name twice returns the same value, so tied weights are stored once. ``blocks`` (the
        checkpoint's quantized form, a :class:`~ember.graphs.weights.adapter.QuantizedBlocks`) is kept in
        the value's ``meta[BLOCKS_META]`` for the compiler's quantization passes.
        """
        if name in self.initializers:
            return self.initializers[name]

        def materialize() -> ir.TensorProtocol:
            array = load()
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"weight {name}: loaded shape {array.shape}, expected {tuple(shape)}")
            return ir.tensor(np.ascontiguousarray(array), name=name)

        tensor = ir.LazyTensor(materialize, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)), const_value=tensor)
        if blocks is not None:
            value.meta[BLOCKS_META] = blocks
        self.initializers[name] = value
        return value

    def add_constant(self, array: np.ndarray, name: str | None = None) -> ir.Value:
        """A small constant initializer (shapes, indices, tables computed at build time)."""
        base = name or f"{self.scope_path.strip('/').replace('/', '.') or 'const'}.const"
        name = self._unique(self._value_names, base)
        array = np.asarray(array)
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(list(array.shape)),
                         const_value=tensor)
        self.initializers[name] = value
        return value

    # nodes --------------------------------------------------------------------------------------
    def add_node(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict[str, Any] | None = None,
                 *, domain: str = "", outputs: Sequence[tuple[ir.DataType, Sequence[Dim] | None]],
                 name: str | None = None) -> list[ir.Value]:
        """Append a node; ``outputs`` gives each output's dtype and (symbolic) shape."""
        node_name = self._unique(self._node_names, f"{self.scope_path}/{name or op_type}")
        out_values = [
            ir.Value(name=self._unique(self._value_names, f"{node_name}_output_{i}"),
                     type=ir.TensorType(dtype), shape=to_ir_shape(shape))
            for i, (dtype, shape) in enumerate(outputs)
        ]
        attrs = [ir.convenience.convert_attribute(k, v) for k, v in (attributes or {}).items() if v is not None]
        node = ir.Node(domain, op_type, list(inputs), attrs, outputs=out_values, name=node_name)
        self.nodes.append(node)
        return out_values

    # result -------------------------------------------------------------------------------------
    def to_model(self) -> ir.Model:
        """The finished ``onnx_ir`` model (IR version and opsets pinned in :mod:`.versions`)."""
        if not self.outputs:
            raise ValueError(f"graph {self.name} has no outputs")
        graph = ir.Graph(self.inputs, self.outputs, nodes=self.nodes, initializers=list(self.initializers.values()),
                         opset_imports=self.opset_imports, name=self.name)
        for key, value in self.metadata.items():
            graph.metadata_props[key] = value
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="ember")
