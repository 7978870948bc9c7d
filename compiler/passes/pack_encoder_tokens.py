"""Run an encoder's token-wise work on the valid tokens only: padding removal for BERT-family graphs.

The runtime pads each batch to its longest row, and in an encoder almost all the time is token-wise
(the q/k/v, output and feed-forward MatMuls, the residual adds, LayerNorms, GELU): only attention mixes
tokens. This pass gathers the valid tokens of the hidden state once, right after the embeddings, into a
packed ``[1, tokens, hidden]`` tensor, keeps every token-wise op on it, and scatters back to
``[batch, sequence, C]`` only where an op needs the padded layout (each attention's q/k/v, whose output
is packed again; pooling; the ``last_hidden_state`` output). The packed tensor stays 3-D so that
onnxruntime's own fusions (BiasGelu) still apply.

Measured on all-MiniLM-L6-v2 (mean pooling + normalize), onnxruntime 1.31 CPU EP, ``ORT_ENABLE_ALL``,
2 threads, on this shared 2-core machine (other jobs running: absolute times drift between runs, so
compare within a row): median of 25 rounds alternating with the same graph lowered without this pass,
in one process; then the ratio over six such runs (two of them with a first version of the pass, two
under heavy load from other jobs):

| batch | without the pass | with it | ratio, six runs |
| --- | --- | --- | --- |
| 32 rows padded to 30 tokens (689 of 960 valid) | 259 ms | 195 ms | 0.73-0.78x (quietest: 192 -> 147 ms) |
| 1 row, 13 tokens (no padding) | 7.88 ms | 7.96 ms | 0.99-1.03x; 1.12x in one loaded run |
| 1 row, 30 tokens (no padding) | 12.19 ms | 12.36 ms | 0.97-1.06x |

The saving is the padding share of the token-wise time, so it grows with the spread of lengths in a batch.

What was measured and *not* added: lowering ONNX ``Attention`` to ``com.microsoft.MultiHeadAttention``
(int32 key_padding_mask) or to ``com.microsoft.Attention`` (q|k|v weights packed, 2-D mask) is within the
noise (quiet run, b32: 192 / 196 / 185 ms; b1x13: 5.36 / 5.50 / 5.44 ms; b1x30: 8.84 / 9.22 / 8.77 ms for
ONNX Attention / MHA / Attention): attention is ~4 % of the profile, MatMul ~80 %. ``BiasGelu`` is fused by
onnxruntime's own session optimizer from the plain ``Add`` + ``Gelu`` (6 in MiniLM), so no pass emits it; its
``SkipLayerNormalization`` fusion of ``Add`` + ``LayerNormalization`` is switched off at load (the target's
``SLOWER_FUSIONS``: its kernel is ~5x slower than the two plain ops on a packed batch).

The pass applies to graphs whose ONNX ``Attention`` nodes take the key padding bias that
``ember.graphs.nn.encoder_attention.key_padding_bias`` builds (``Expand(Unsqueeze(Where(Equal(mask, 0))))``);
any other graph (decoders, with ``ember.CachedAttention`` / ``GroupQueryAttention``) is left unchanged.
Padding positions of an unpacked tensor hold a copy of a valid token (they are masked or discarded).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import input_at, static_dim

UNARY = {"Gelu", "Cast", "Erf", "Tanh", "Sigmoid", "Relu", "Identity"}
BINARY = {"Add", "Sub", "Mul", "Div"}


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _constant_value(value: ir.Value | None) -> float | None:
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def key_padding_mask(bias: ir.Value | None) -> ir.Value | None:
    """The ``attention_mask`` behind ``key_padding_bias``: ``Expand(Unsqueeze(Where(Equal(mask, 0), -big, 0)))``.

    None for any other mask: then which tokens are valid is not known and nothing is packed.
    """
    expand = _producer(bias, "Expand")
    unsqueeze = _producer(expand.inputs[0], "Unsqueeze") if expand else None
    where = _producer(unsqueeze.inputs[0], "Where") if unsqueeze else None
    equal = _producer(where.inputs[0], "Equal") if where else None
    if where is None or equal is None or _constant_value(equal.inputs[1]) != 0.0:
        return None
    masked, kept = _constant_value(where.inputs[1]), _constant_value(where.inputs[2])
    if masked is None or masked > -1e30 or kept != 0.0:
        return None
    return equal.inputs[0]


def _is_small_constant(value: ir.Value) -> bool:
    """A constant that broadcasts along the last axis only (a bias, a scalar)."""
    return value.const_value is not None and len(value.const_value.shape) <= 1


def _last_axis(node: ir.Node, name: str, rank: int, default: int) -> bool:
    attr = node.attributes.get(name)
    axis = attr.value if attr is not None else default
    return axis in (-1, rank - 1)


class _Packer:
    def __init__(self, model: ir.Model, mask: ir.Value):
        self.graph = model.graph
        self.mask = mask
        self.packed: dict[int, ir.Value] = {}  # id -> packed value
        self.original_shapes: dict[int, ir.Shape | None] = {}
        self.unpacked: dict[int, ir.Value] = {}
        self.count = 0

    # helpers ------------------------------------------------------------------------------------
    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        if name not in self.graph.initializers:
            tensor = ir.tensor(array, name=name)
            self.graph.register_initializer(ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype),
                                                     shape=ir.Shape(tensor.shape.numpy())))
        return self.graph.initializers[name]

    def node(self, op: str, inputs: list, name: str, attrs: dict | None = None) -> ir.Node:
        self.count += 1
        attributes = [ir.convenience.convert_attribute(k, v) for k, v in (attrs or {}).items()]
        return ir.Node("", op, inputs, attributes, outputs=[ir.Value(name=f"{name}_output_{self.count}")],
                       name=f"{name}_{self.count}")

    def flat(self, value: ir.Value, width: int, scope: str) -> ir.Node:
        return self.node("Reshape", [value, self.constant(f"pack.flat_{width}", np.array([-1, width], np.int64))],
                         f"{scope}/Reshape")

    # indices ------------------------------------------------------------------------------------
    def build_indices(self, before: ir.Node) -> None:
        """``token_index`` [1, tokens]: flat positions of valid tokens; ``inverse_index`` [batch, sequence]."""
        equal = self.node("Equal", [self.mask, self.constant("pack.zero", np.array(0, np.int64))], "/pack/Equal")
        is_token = self.node("Not", [equal.outputs[0]], "/pack/Not")
        nodes = [equal, is_token]
        ones = self.node("Cast", [is_token.outputs[0]], "/pack/Cast", {"to": int(ir.DataType.INT64)})
        flat = self.node("Reshape", [ones.outputs[0], self.constant("pack.minus_one", np.array([-1], np.int64))],
                         "/pack/flat_mask")
        token_index = self.node("NonZero", [flat.outputs[0]], "/pack/token_index")
        cumsum = self.node("CumSum", [flat.outputs[0], self.constant("pack.axis0", np.array(0, np.int64))],
                           "/pack/CumSum")
        minus = self.node("Sub", [cumsum.outputs[0], self.constant("pack.one", np.array(1, np.int64))], "/pack/Sub")
        clamp = self.node("Max", [minus.outputs[0], self.constant("pack.zero", np.array(0, np.int64))], "/pack/Max")
        shape = self.node("Shape", [self.mask], "/pack/Shape")
        inverse = self.node("Reshape", [clamp.outputs[0], shape.outputs[0]], "/pack/inverse_index")
        nodes += [ones, flat, token_index, cumsum, minus, clamp, shape, inverse]
        self.graph.insert_before(before, nodes)
        self.token_index, self.inverse_index = token_index.outputs[0], inverse.outputs[0]

    # layout changes -----------------------------------------------------------------------------
    def pack_after(self, value: ir.Value, after: ir.Node, scope: str) -> ir.Value:
        """Gather the valid tokens of ``value`` [batch, sequence, C]; uses of ``value`` move to the result."""
        width = static_dim(value, -1)
        flat = self.flat(value, width, scope)
        gather = self.node("Gather", [flat.outputs[0], self.token_index], f"{scope}/Gather", {"axis": 0})
        self.graph.insert_after(after, [flat, gather])
        packed = gather.outputs[0]
        packed.type, packed.shape = value.type, ir.Shape([1, "tokens", width])
        ir.convenience.replace_all_uses_with(value, packed)
        flat.replace_input_with(0, value)
        self.packed[id(packed)] = packed
        return packed

    def unpack(self, value: ir.Value, before: ir.Node | None) -> ir.Value:
        """``value`` back in ``[batch, sequence, C]`` (inserted before ``before``, or after its producer)."""
        if id(value) not in self.unpacked:
            width = static_dim(value, -1)
            scope = f"/unpack/{value.name}"
            flat = self.flat(value, width, scope)
            gather = self.node("Gather", [flat.outputs[0], self.inverse_index], f"{scope}/Gather", {"axis": 0})
            if before is None:
                producer = value.producer()
                if producer is None:  # a packed value is always a node's output (a Gather, or a token-wise op's)
                    raise ValueError(f"packed value {value.name} has no producer to unpack after")
                self.graph.insert_after(producer, [flat, gather])
            else:
                self.graph.insert_before(before, [flat, gather])
            out = gather.outputs[0]
            original = self.original_shapes.get(id(value))
            out.type = value.type
            out.shape = original if original is not None else ir.Shape([*self._mask_shape(), width])
            self.unpacked[id(value)] = out
        return self.unpacked[id(value)]

    def _mask_shape(self) -> ir.Shape:
        """The mask's ``[batch, sequence]`` (:func:`pack_encoder_tokens` packs only for a mask of known shape)."""
        if self.mask.shape is None:
            raise ValueError(f"attention mask {self.mask.name} has no shape: cannot unpack to [batch, sequence]")
        return self.mask.shape

    def mark_packed(self, node: ir.Node) -> None:
        for out in node.outputs:
            self.original_shapes[id(out)] = out.shape
            if out.shape is not None:
                out.shape = ir.Shape([1, "tokens", out.shape[-1]])
            self.packed[id(out)] = out

    # the walk -----------------------------------------------------------------------------------
    def token_wise(self, node: ir.Node) -> bool:
        """Whether ``node`` computes each token from that token alone, given its packed inputs."""
        if node.domain != "":
            return False
        inputs = [v for v in node.inputs if v is not None]
        packed = [id(v) in self.packed for v in inputs]
        op = node.op_type
        if op in UNARY:
            return all(packed)
        if op in BINARY:
            return all(p or _is_small_constant(v) for p, v in zip(packed, inputs))
        if op == "MatMul":
            weight = input_at(node, 1)
            return packed[0] and weight.const_value is not None and len(weight.const_value.shape) == 2
        if op == "LayerNormalization":
            return packed[0] and all(_is_small_constant(v) for v in inputs[1:]) and _last_axis(node, "axis", 3, -1)
        if op == "Split":
            return packed[0] and all(v.const_value is not None for v in inputs[1:]) and _last_axis(node, "axis", 3, 0)
        return False

    def walk(self) -> None:
        for node in list(self.graph):
            if not any(v is not None and id(v) in self.packed for v in node.inputs):
                continue
            if node.op_type == "Attention" and node.domain == "":
                for i in range(3):
                    query_key_value = node.inputs[i]
                    if query_key_value is not None and id(query_key_value) in self.packed:
                        node.replace_input_with(i, self.unpack(query_key_value, node))
                self.pack_after(node.outputs[0], node, f"{node.name}/pack")
            elif self.token_wise(node):
                self.mark_packed(node)
            else:
                for i, value in enumerate(node.inputs):
                    if value is not None and id(value) in self.packed:
                        node.replace_input_with(i, self.unpack(value, node))
        for i, value in enumerate(list(self.graph.outputs)):
            if id(value) in self.packed:
                out = self.unpack(value, None)
                name, value.name = value.name, f"{value.name}.packed"
                out.name = name
                self.graph.outputs[i] = out


def pack_encoder_tokens(model: ir.Model) -> ir.Model:
    graph = model.graph
    attentions = [n for n in graph if n.op_type == "Attention" and n.domain == ""]
    masks = {id(key_padding_mask(n.inputs[3] if len(n.inputs) > 3 else None)) for n in attentions}
    if not attentions or len(masks) != 1:
        return model
    mask = key_padding_mask(attentions[0].inputs[3] if len(attentions[0].inputs) > 3 else None)
    if mask is None or mask.shape is None or len(mask.shape) != 2:
        return model
    # The hidden state entering the first block: the MatMul input behind its query (through Add / Split).
    producer = input_at(attentions[0], 0).producer()
    while producer is not None and producer.op_type in ("Split", "Add") and producer.domain == "":
        producer = input_at(producer, 0).producer()
    if producer is None or producer.op_type != "MatMul":
        return model
    hidden = input_at(producer, 0)
    embeddings = hidden.producer()
    if embeddings is None:
        return model
    if hidden.shape is None or len(hidden.shape) != 3 or not isinstance(hidden.shape[-1], int):
        return model
    packer = _Packer(model, mask)
    packer.build_indices(embeddings)
    packer.pack_after(hidden, embeddings, "/pack/hidden")
    packer.walk()
    return model
