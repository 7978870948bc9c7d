"""Run a lowered graph in float16 or bfloat16 (the ort-cuda target's half encodings), keeping float32 where it matters.

A GPU's tensor cores run half precision; weights in half take half of float32's bytes, and the KV cache too. The
pass changes where float32 *enters* the graph -- initializers (converted when the artifact is written: lazy),
float graph inputs (the KV cache), ``Cast(to=FLOAT)``, ``Constant`` / ``ConstantOfShape`` values -- so that every
op downstream computes in the half type; onnxruntime infers the rest. Constants are clipped to the half type's
finite range (a masking value of float32's lowest becomes float16's lowest, not -inf).

What stays float32, and why:

* **Norm statistics.** ``RMSNormalization`` / ``LayerNormalization`` get ``stash_type=1`` (their mean and variance
  in float32, as transformers' ``LlamaRMSNorm`` upcasts). ``com.microsoft.SkipSimplifiedLayerNormalization``
  has no such attribute: its schema types the statistics ``U`` = float whatever ``T`` is (kept so here); that its
  CUDA kernel accumulates in float32 is not verified here (no GPU).
* **Softmax.** Each ``Softmax`` (the explicit attention of the fallback lowerings) runs in float32 with the
  ``Where`` that masks its scores: a ``Cast`` to float32 before, one back after; the mask's fill value stays
  float32's lowest. ONNX ``Attention`` nodes (encoders) get ``softmax_precision=1`` instead. The fused kernels
  (GroupQueryAttention, PagedAttention) keep their own float32 softmax internally.
* **Outputs.** Every float graph output that is not a KV cache (logits, hidden states, pooled embeddings) is
  cast back to float32: the runtime samples and pools on float32. KV caches (a GroupQueryAttention's or
  PagedAttention's present outputs, a ScatterND into a graph input) stay half, like their graph inputs: the runtime
  allocates what the graph declares, and the manifest's ``kv_params.dtype`` must say the half type.
* **Float32-only slots.** GroupQueryAttention's ``k_scale``/``v_scale`` (12, 13) and PagedAttention's (14, 15)
  are ``T_KV_SCALE`` = float in the schemas.

Rotary cos/sin tables become half like every initializer: GroupQueryAttention, PagedAttention and ONNX
``RotaryEmbedding`` take them in the activations' type ``T`` (transformers also casts them to the activations'
dtype before rotating). Integer tensors are untouched.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import MS_DOMAIN

from .base import Pass

FLOAT = ir.DataType.FLOAT
HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

#: (domain, op) -> input slots whose schema type is float32 whatever the activations are.
FLOAT32_INPUTS = {(MS_DOMAIN, "GroupQueryAttention"): (12, 13), (MS_DOMAIN, "PagedAttention"): (14, 15)}
#: (domain, op) -> output slots computed in float32 (norm statistics, type ``U``).
FLOAT32_OUTPUTS = {(MS_DOMAIN, "SkipSimplifiedLayerNormalization"): (1, 2),
                   (MS_DOMAIN, "SkipLayerNormalization"): (1, 2), ("", "LayerNormalization"): (1, 2)}
#: Norms whose statistics are computed in float32 with ``stash_type=1``.
STASHED_NORMS = {("", "RMSNormalization"), ("", "LayerNormalization"), ("", "SimplifiedLayerNormalization")}
#: Producers whose output slots are KV caches (kept half; not cast back at the graph's end).
KV_CACHE_OUTPUTS = {(MS_DOMAIN, "GroupQueryAttention"): (1, 2), (MS_DOMAIN, "PagedAttention"): (1, 2)}


def float32_islands(graph: ir.Graph) -> set[ir.Node]:
    """The nodes that run in float32: each ``Softmax`` and the ``Where`` that masks its input."""
    island = set()
    for node in graph:
        if node.op_type == "Softmax" and node.domain == "":
            island.add(node)
            producer = node.inputs[0].producer() if node.inputs[0] is not None else None
            if producer is not None and producer.op_type == "Where" and producer.domain == "":
                island.add(producer)
    return island


def is_kv_cache(value: ir.Value) -> bool:
    """Whether a graph output is a KV cache (updated in place from a graph input)."""
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type == "ScatterND" and producer.domain == "":
        return producer.inputs[0] is not None and producer.inputs[0].is_graph_input()
    return value.index() in KV_CACHE_OUTPUTS.get((producer.domain, producer.op_type), ())


def _half_array(array: np.ndarray, half: ir.DataType) -> np.ndarray:
    dtype = np.dtype(half.numpy())
    limit = float(np.finfo(dtype).max) if half == ir.DataType.FLOAT16 else float(np.finfo(np.float32).max)
    return np.clip(np.asarray(array, np.float32), -limit, limit).astype(dtype)


def _half_tensor(tensor: ir.TensorProtocol, half: ir.DataType) -> ir.TensorProtocol:
    name = tensor.name
    return ir.LazyTensor(lambda: ir.tensor(_half_array(tensor.numpy(), half), name=name), dtype=half,
                         shape=ir.Shape(tensor.shape.numpy()), name=name)


def _retype(value: ir.Value, half: ir.DataType) -> None:
    if value.dtype == FLOAT:
        value.type = ir.TensorType(half)


def _cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, before: ir.Node, name: str) -> ir.Value:
    out = ir.Value(name=name, type=ir.TensorType(to), shape=value.shape)
    graph.insert_before(before, ir.Node("", "Cast", [value], [ir.AttrInt64("to", int(to))], outputs=[out],
                                        name=name.removesuffix("_output_0")))
    return out


def _float32_uses_only(value: ir.Value, island: set[ir.Node]) -> bool:
    uses = list(value.uses())
    return bool(uses) and all(use.node in island or use.idx in FLOAT32_INPUTS.get((use.node.domain,
                                                                                  use.node.op_type), ())
                              for use in uses)


def convert_to_half(dtype: ir.DataType | str) -> Pass:
    """The pass that runs the graph in ``dtype`` (float16 or bfloat16; see the module doc)."""
    names = {t.name.lower(): t for t in HALF_TYPES}
    half = names.get(dtype.lower()) if isinstance(dtype, str) else ir.DataType(dtype)
    if half not in HALF_TYPES:
        raise ValueError(f"convert_to_half: {dtype} is not a half type (supported: {', '.join(names)})")

    def run(model: ir.Model) -> ir.Model:
        graph = model.graph
        if model.functions:
            raise ValueError("convert_to_half converts the main graph only; inline the model's functions first")
        island = float32_islands(graph)
        for value in graph.initializers.values():
            if value.dtype == FLOAT and value.const_value is not None and not _float32_uses_only(value, island):
                value.const_value = _half_tensor(value.const_value, half)
                _retype(value, half)
        for value in graph.inputs:
            _retype(value, half)
        for node in list(graph):
            if node not in island:
                _convert_node(node, half)
        for node in [n for n in graph if n in island]:  # in graph order
            _isolate(graph, node, island, half)
        for i, output in enumerate(list(graph.outputs)):
            if output.dtype == half and not is_kv_cache(output):
                name, output.name = output.name, f"{output.name}/{half.name.lower()}"
                cast = ir.Node("", "Cast", [output], [ir.AttrInt64("to", int(FLOAT))],
                               outputs=[ir.Value(name=name, type=ir.TensorType(FLOAT), shape=output.shape)],
                               name=f"{name}/Cast")
                graph.append(cast)
                graph.outputs[i] = cast.outputs[0]
        return model

    run.__name__ = f"convert_to_{half.name.lower()}"
    return run


def _convert_node(node: ir.Node, half: ir.DataType) -> None:
    """Retype one node's float32 outputs and attributes (not its float32-only output slots)."""
    key = (node.domain, node.op_type)
    keep = FLOAT32_OUTPUTS.get(key, ())
    for i, value in enumerate(node.outputs):
        if i not in keep:
            _retype(value, half)
    if key in STASHED_NORMS:
        node.attributes["stash_type"] = ir.AttrInt64("stash_type", 1)
    if key == ("", "Attention"):
        node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", int(FLOAT))
    if key == ("", "Cast") and node.attributes["to"].value == FLOAT:
        node.attributes["to"] = ir.AttrInt64("to", int(half))
    for name in ("value", "value_float", "value_floats"):  # Constant, ConstantOfShape
        attr = node.attributes.get(name)
        if attr is None or node.domain != "":
            continue
        if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == FLOAT:
            node.attributes[name] = ir.AttrTensor(name, ir.tensor(_half_array(attr.value.numpy(), half)))
        elif name != "value":
            array = _half_array(np.asarray(attr.value, np.float32), half)
            del node.attributes[name]
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))


def _isolate(graph: ir.Graph, node: ir.Node, island: set[ir.Node], half: ir.DataType) -> None:
    """Keep an island node in float32: Cast its half inputs up, and its outputs back down for other readers."""
    for i, value in enumerate(node.inputs):
        if value is None or (node.op_type == "Where" and i == 0):  # absent, or the boolean mask
            continue
        if value.producer() in island or (value.const_value is not None and value.dtype == FLOAT):
            continue
        node.replace_input_with(i, _cast(graph, value, FLOAT, node, f"{node.name}/input_{i}/float32_output_0"))
    for value in node.outputs:
        value.type = ir.TensorType(FLOAT)
        readers = [use for use in value.uses() if use.node not in island]
        if not readers:
            continue
        down = ir.Value(name=f"{value.name}/{half.name.lower()}", type=ir.TensorType(half), shape=value.shape)
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", int(half))], outputs=[down],
                       name=f"{node.name}/Cast_{half.name.lower()}")
        graph.insert_after(node, cast)
        for use in readers:
            use.node.replace_input_with(use.idx, down)
