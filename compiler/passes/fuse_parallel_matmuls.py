"""Fuse MatMuls that read the same input into one wider MatMul (q/k/v; gate/up).

At batch 1 a decode step is a chain of matrix-vector products; each kernel call has a fixed cost
(thread-pool dispatch, packing), and one wide product streams the same weight bytes as several narrow
ones. So ``MatMul(x, Wq), MatMul(x, Wk), MatMul(x, Wv)`` becomes ``Split(MatMul(x, [Wq|Wk|Wv]))``; when every
product is followed by a bias ``Add``, the biases are concatenated too. The concatenated weight is a lazy
tensor: it is built when the artifact is written, from the original (memory-mapped) arrays. Weights that
the checkpoint stores block-quantized keep that form through the fusion (their rows are concatenated), so
the quantization passes can still repack them exactly.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.graph import BLOCKS_META
from ember.graphs.weights.adapter import QuantizedBlocks

from .base import input_at, nodes_of


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    return None if value is None else value.const_value


def _bias_add(matmul: ir.Node, weight: ir.TensorProtocol) -> tuple[ir.Node, ir.TensorProtocol] | None:
    """The ``Add(matmul_output, bias)`` that is the product's only consumer, with its constant bias of one value per
    output feature (a bias that broadcasts, ``[1]``, would not concatenate into the fused product's)."""
    users = list(matmul.outputs[0].uses())
    if len(users) != 1:
        return None
    add = users[0].node
    if add.op_type != "Add" or add.domain != "":
        return None
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    tensor = _constant(other)
    if tensor is None or tensor.shape.numpy() != (weight.shape.numpy()[1],) or tensor.dtype != weight.dtype:
        return None
    return add, tensor


def _concat_lazy(name: str, tensors: list[ir.TensorProtocol], axis: int) -> ir.Value:
    shape = list(tensors[0].shape.numpy())  # a tensor's shape is static
    shape[axis] = sum(t.shape.numpy()[axis] for t in tensors)
    dtype = tensors[0].dtype

    def materialize() -> ir.TensorProtocol:
        return ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis), name=name)

    lazy = ir.LazyTensor(materialize, dtype=dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=lazy)


def _block_type(value: ir.Value) -> str | None:
    blocks = value.meta.get(BLOCKS_META)
    return None if blocks is None else blocks.qtype


def _concat_blocks(values: list[ir.Value]) -> QuantizedBlocks | None:
    """The checkpoint blocks of ``[W1; W2; ...]`` (rows of the ``[out, in]`` weights), if every part has some."""
    parts: list[QuantizedBlocks] = [p for p in (v.meta.get(BLOCKS_META) for v in values) if p is not None]
    if len(parts) != len(values) or len({(p.qtype, p.shape[1]) for p in parts}) != 1:
        return None
    shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
    return QuantizedBlocks(parts[0].qtype, shape, lambda: np.concatenate([p.load() for p in parts], axis=0))


def _fused_name(matmuls: list[ir.Node]) -> str:
    names = [input_at(m, 1).name or "" for m in matmuls]
    prefix = names[0].rsplit(".", 2)[0] if names[0].count(".") >= 2 else "fused"
    parts = [n.rsplit(".", 2)[-2] if n.count(".") >= 2 else str(i) for i, n in enumerate(names)]
    return f"{prefix}.{'_'.join(p.removesuffix('_proj') for p in parts)}_proj.weight"


def fuse_parallel_matmuls(model: ir.Model) -> ir.Model:
    graph = model.graph
    # id(x) -> the MatMuls of x with a constant 2-D weight, each with that weight's tensor
    groups: dict[int, list[tuple[ir.Node, ir.TensorProtocol]]] = defaultdict(list)
    for node in nodes_of(model, "MatMul"):
        tensor = _constant(node.inputs[1])
        if tensor is not None and len(tensor.shape) == 2 and node.inputs[0] is not None:
            groups[id(node.inputs[0])].append((node, tensor))
    for group in groups.values():
        matmuls, tensors = [m for m, _ in group], [t for _, t in group]
        if len(matmuls) < 2 or len({t.shape.numpy()[0] for t in tensors}) != 1:
            continue
        weights = [input_at(m, 1) for m in matmuls]
        if len({_block_type(w) for w in weights}) != 1:
            continue  # checkpoint blocks of different types (or some float): each stays repackable on its own
        adds = [_bias_add(m, t) for m, t in group]
        biases = [a[1] for a in adds if a is not None]
        with_bias = len(biases) == len(adds)
        # per product, the nodes the split replaces, the one whose output it takes over first
        replaced = [[a[0], m] if with_bias and a is not None else [m] for m, a in zip(matmuls, adds)]
        if any(nodes[0].outputs[0].is_graph_output() for nodes in replaced):
            continue  # a graph output keeps its producer (and its name)
        x = matmuls[0].inputs[0]
        widths = [t.shape.numpy()[1] for t in tensors]
        name = _fused_name(matmuls)
        prefix = f"/{name.removesuffix('.weight').replace('.', '/')}"  # the new nodes' names
        weight = _concat_lazy(name, tensors, axis=1)
        blocks = _concat_blocks(weights)
        if blocks is not None:
            weight.meta[BLOCKS_META] = blocks
        graph.register_initializer(weight)
        first = min(matmuls, key=graph.index)  # insert before the earliest, where x already exists
        fused = ir.Node("", "MatMul", [x, weight], outputs=[ir.Value(name=f"{name}/MatMul_output_0")],
                        name=f"{prefix}/MatMul")
        new_nodes = [fused]
        out = fused.outputs[0]
        if with_bias:
            bias = _concat_lazy(name.replace(".weight", ".bias"), biases, axis=0)
            graph.register_initializer(bias)
            add = ir.Node("", "Add", [out, bias], outputs=[ir.Value(name=f"{name}/Add_output_0")],
                          name=f"{prefix}/Add")
            new_nodes.append(add)
            out = add.outputs[0]
        sizes = ir.Value(name=f"{name}/split_sizes", const_value=ir.tensor(np.array(widths, np.int64)),
                         type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(widths)]))
        graph.register_initializer(sizes)
        split = ir.Node("", "Split", [out, sizes], [ir.AttrInt64("axis", -1)],
                        outputs=[ir.Value(name=f"{name}/Split_output_{i}") for i in range(len(widths))],
                        name=f"{prefix}/Split")
        new_nodes.append(split)
        graph.insert_before(first, new_nodes)
        for i, nodes in enumerate(replaced):
            old = nodes[0].outputs[0]
            split.outputs[i].shape, split.outputs[i].type = old.shape, old.type
            ir.convenience.replace_all_uses_with(old, split.outputs[i])
            graph.remove(nodes, safe=True)
    return model


def pack_attention_qkv(model: ir.Model) -> ir.Model:
    """Feed ``GroupQueryAttention`` the fused q|k|v product directly (its packed-QKV mode): no Split."""
    for node in nodes_of(model, "GroupQueryAttention", "com.microsoft"):
        q, k, v = node.inputs[:3]
        split = q.producer() if q is not None else None
        if split is None or split.op_type != "Split" or len(split.outputs) != 3:
            continue
        if list(split.outputs) != [q, k, v] or any(len(list(o.uses())) != 1 for o in split.outputs):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        model.graph.remove(split, safe=True)
    return model
