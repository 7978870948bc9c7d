"""The int8 KV cache at the compiler level, against real onnxruntime.

* What onnxruntime's CPU GroupQueryAttention does with an int8 cache (the contract the calibration relies on):
  it writes ``clip(round_half_to_even(x / scale), -128, 127)`` (saturating, ties to even) of the rotated keys
  and the values, per (kv head, channel), and attends over the dequantized cache, the prompt's own tokens included.
* The calibration's pieces: the rotation-invariant key bound, the scales, the choice of calibration tokens,
  and the measured ranges against the float graph's own caches.
* The pass: int8 past/present, the scale inputs and attributes, a valid model; options it refuses.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ember.compiler.calibration.kv_cache import (CALIBRATION_TEXT, MIN_DISTINCT_IDS, SHORT_ROWS, calibration_tokens,
                                                 measure_kv_ranges, rotation_invariant_range, scales_from_ranges)
from ember.compiler.compile import CompileOptions
from ember.compiler.passes.lower_attention_gqa import gqa_kv_caches, kv_cache_bit_widths, quantize_kv_cache
from ember.compiler.targets import get_target
from ember.graphs.architectures.llama import SPEC
from ember.runtime.backends import OrtCpuBackend
from ember.graphs.options import GraphOptions
from ember.graphs.ir.custom.attention import apply_rotary, attention_reference
from ember.graphs.nn.kv_cache import KVCacheStrategy
from ember.graphs.weights import SafetensorsWeights
from ember.runtime.pipelines import ModelSource

from ..reference.tiny_models import make_model

NUM_HEADS, KV_HEADS, HEAD_DIM, MAX_LEN = 4, 2, 16, 32


def gqa_int8_session(interleaved: bool = False) -> ort.InferenceSession:
    """One GroupQueryAttention: packed q|k|v, in-kernel rotary, int8 past/present, per-channel scales."""
    width = (NUM_HEADS + 2 * KV_HEADS) * HEAD_DIM
    cache = ["batch", KV_HEADS, "max_length", HEAD_DIM]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", "seq", width]),
              helper.make_tensor_value_info("past_key", TensorProto.INT8, cache),
              helper.make_tensor_value_info("past_value", TensorProto.INT8, cache),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, [MAX_LEN, HEAD_DIM // 2]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, [MAX_LEN, HEAD_DIM // 2]),
              helper.make_tensor_value_info("k_scale", TensorProto.FLOAT, [1, KV_HEADS, 1, HEAD_DIM]),
              helper.make_tensor_value_info("v_scale", TensorProto.FLOAT, [1, KV_HEADS, 1, HEAD_DIM])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "seq", NUM_HEADS * HEAD_DIM]),
               helper.make_tensor_value_info("present_key", TensorProto.INT8, cache),
               helper.make_tensor_value_info("present_value", TensorProto.INT8, cache)]
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin", "", "", "", "k_scale", "v_scale"],
        ["output", "present_key", "present_value"], domain="com.microsoft", num_heads=NUM_HEADS,
        kv_num_heads=KV_HEADS, do_rotary=1, rotary_interleaved=int(interleaved), k_quant_type="PER_CHANNEL",
        v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    model = helper.make_model(helper.make_graph([node], "gqa_int8", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def quantize(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x / scale), -128, 127).astype(np.int8)  # np.round: half to even


@pytest.mark.parametrize("interleaved", [False, True])
def test_onnxruntime_int8_cache_quantizes_saturating_and_attends_dequantized(interleaved):
    rng = np.random.default_rng(0)
    session = gqa_int8_session(interleaved)
    positions = np.arange(MAX_LEN)[:, None] / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    cos, sin = np.cos(positions).astype(np.float32), np.sin(positions).astype(np.float32)
    k_scale = rng.uniform(0.03, 0.06, (1, KV_HEADS, 1, HEAD_DIM)).astype(np.float32)  # some values saturate
    v_scale = rng.uniform(0.03, 0.06, (1, KV_HEADS, 1, HEAD_DIM)).astype(np.float32)
    v_scale[0, 0, 0, :11] = 2.0 ** -5  # exact ties below
    past_key = np.zeros((1, KV_HEADS, MAX_LEN, HEAD_DIM), np.int8)
    past_value = np.zeros_like(past_key)
    key_buffer, value_buffer = ort.OrtValue.ortvalue_from_numpy(past_key), ort.OrtValue.ortvalue_from_numpy(past_value)
    q_end, k_end = NUM_HEADS * HEAD_DIM, (NUM_HEADS + KV_HEADS) * HEAD_DIM
    chunks, outputs = [], []
    for step, n in enumerate([7, 1, 1, 1]):  # a prompt, then three decode steps
        qkv = rng.normal(0.0, 1.5, (1, n, (NUM_HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32)
        if step == 0:  # values: ties of x / scale at +-0.5, +-1.5, +-2.5 and far out of range (saturation)
            v_codes = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.6, 127.5, 300.0, -128.5, -300.0], np.float32)
            qkv[0, 0, k_end:k_end + len(v_codes)] = v_codes * v_scale[0, 0, 0, :len(v_codes)]
        past = sum(c.shape[1] for c in chunks)
        binding = session.io_binding()
        for name, array in {"qkv": qkv, "seqlens_k": np.array([past + n - 1], np.int32),
                            "total": np.array(past + n, np.int32), "cos": cos, "sin": sin,
                            "k_scale": k_scale, "v_scale": v_scale}.items():
            binding.bind_cpu_input(name, array)
        binding.bind_ortvalue_input("past_key", key_buffer)
        binding.bind_ortvalue_input("past_value", value_buffer)
        binding.bind_ortvalue_output("present_key", key_buffer)  # one buffer, written in place
        binding.bind_ortvalue_output("present_value", value_buffer)
        binding.bind_output("output", "cpu")
        session.run_with_iobinding(binding)
        outputs.append(binding.get_outputs()[2].numpy())
        chunks.append(qkv)
    qkv = np.concatenate(chunks, axis=1)
    total = qkv.shape[1]
    heads = lambda x, h: x.reshape(1, total, h, HEAD_DIM).transpose(0, 2, 1, 3)  # noqa: E731
    keys = apply_rotary(heads(qkv[..., q_end:k_end], KV_HEADS), cos[:total], sin[:total], interleaved)
    values = heads(qkv[..., k_end:], KV_HEADS)
    np.testing.assert_array_equal(past_key[:, :, :total], quantize(keys, k_scale))
    np.testing.assert_array_equal(past_value[:, :, :total], quantize(values, v_scale))
    assert past_value[0, 0, 0, :11].tolist() == [0, 2, 2, 0, -2, -2, 127, 127, 127, -128, -128]
    assert not past_key[:, :, total:].any()  # nothing written past the tokens

    query = apply_rotary(heads(qkv[..., :q_end], NUM_HEADS), cos[:total], sin[:total], interleaved)
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(1, total, -1).astype(np.float32)  # noqa: E731
    zeros = np.zeros((1, KV_HEADS, total, HEAD_DIM), np.float32)
    expected, _, _ = attention_reference(flat(query), flat(quantize(keys, k_scale) * k_scale),
                                         flat(quantize(values, v_scale) * v_scale), zeros, zeros, np.array([0]),
                                         np.array([total]), num_heads=NUM_HEADS, kv_num_heads=KV_HEADS)
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_key_bound_holds_at_every_rotation(interleaved):
    """A key rotated to all angles takes its pair's length on either channel: the bound covers every position."""
    rng = np.random.default_rng(1)
    key = rng.normal(size=(KV_HEADS, 1, HEAD_DIM)).astype(np.float32)
    angles = np.linspace(0, 2 * np.pi, 720)[:, None] * np.ones(HEAD_DIM // 2)
    rotated = apply_rotary(np.repeat(key, 720, axis=1), np.cos(angles), np.sin(angles), interleaved)
    seen_at_few_positions = rotation_invariant_range(rotated[:, :3], HEAD_DIM, interleaved)
    assert np.all(seen_at_few_positions >= np.abs(rotated).max(axis=1) - 1e-5)
    np.testing.assert_allclose(seen_at_few_positions, np.abs(rotated).max(axis=1), rtol=1e-3)
    partial = rotation_invariant_range(rotated, 0, interleaved)  # no rotary: plain per-channel maxima
    np.testing.assert_array_equal(partial, np.abs(rotated).max(axis=1))


def test_scales_have_margin_and_a_floor():
    ranges = {"past_key_values.0.key": np.array([[10.0, 0.0, 5.0]], np.float32)}
    scales = scales_from_ranges(ranges, 8, margin=1.5)["past_key_values.0.key"]
    np.testing.assert_allclose(scales, np.array([[15.0, 0.15, 7.5]]) / 127, rtol=1e-6)
    all_zero = scales_from_ranges({"v": np.zeros((1, 3), np.float32)}, 8)["v"]
    assert np.all(all_zero > 0)


def test_calibration_tokens_fall_back_to_random_ids_for_a_tokenizer_without_english():
    words = CALIBRATION_TEXT.split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    ids = [vocab[w] for w in words]
    rows, source = calibration_tokens(lambda text: [vocab[w] for w in text.split()], len(vocab), max_tokens=100)
    assert source == "text" and len(rows) == 1 + SHORT_ROWS and rows[0].tolist() == ids[:100]
    windows = {tuple(ids[i:i + 32]) for i in range(len(ids) - 31)}
    assert all(tuple(r.tolist()) in windows for r in rows[1:])  # windows of the text, first and last included
    assert rows[1].tolist() == ids[:32] and rows[-1].tolist() == ids[-32:]
    rows, source = calibration_tokens(lambda text: [3] * len(text.split()), 160, max_tokens=64)  # all <unk>
    assert source == "random" and [len(r) for r in rows] == [64] + [32] * SHORT_ROWS
    assert len(set(np.concatenate(rows).tolist())) > MIN_DISTINCT_IDS and max(map(max, rows)) < 160


@pytest.fixture(scope="module")
def lowered_tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama-gqa-llama3", directory)
    source = ModelSource.resolve(directory)
    graph = SPEC.build(source.hf_config(), SafetensorsWeights(directory), "safetensors", GraphOptions())
    return source.hf_config(), get_target("ort-cpu").lower(graph)


def test_measured_ranges_are_the_float_graphs_cache_maxima(lowered_tiny):
    hf_config, lowered = lowered_tiny
    rows = [np.random.default_rng(s).integers(0, hf_config.vocab_size, n) for s, n in ((0, 40), (1, 12), (2, 12))]
    ranges = measure_kv_ranges(lowered, rows, OrtCpuBackend())  # the runtime backend runs the float graph
    caches = gqa_kv_caches(lowered)
    assert len(caches) == hf_config.num_hidden_layers and set(ranges) == {n for c in caches for n in (c.key, c.value)}
    session = ort.InferenceSession(ir.to_proto(lowered).SerializeToString(), providers=["CPUExecutionProvider"])
    seen = {name: np.zeros(bound.shape, np.float32) for name, bound in ranges.items()}
    for row in rows:
        feeds = {"input_ids": row.reshape(1, -1).astype(np.int64), "input_lengths": np.array([len(row)], np.int32),
                 "cache_lengths": np.array([0], np.int32)}
        for cache in caches:
            for name in (cache.key, cache.value):
                feeds[name] = np.zeros((1, cache.kv_num_heads, len(row), cache.head_dim), np.float32)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        for cache in caches:
            for name, present in ((cache.key, cache.present_key), (cache.value, cache.present_value)):
                seen[name] = np.maximum(seen[name], np.abs(outputs[present][0]).max(axis=1))
    for cache in caches:
        np.testing.assert_allclose(ranges[cache.value], seen[cache.value], rtol=1e-6)
        assert np.all(ranges[cache.key] >= seen[cache.key] - 1e-6)  # the rotation-invariant bound
        assert np.all(ranges[cache.key] <= np.sqrt(2) * seen[cache.key].max())


def test_quantize_pass_gives_an_int8_cache_graph(lowered_tiny):
    hf_config, lowered = lowered_tiny
    lowered = ir.from_proto(ir.to_proto(lowered))  # a copy: the fixture's graph stays float
    caches = gqa_kv_caches(lowered)
    scales = {n: np.full((c.kv_num_heads, c.head_dim), 0.01, np.float32) for c in caches for n in (c.key, c.value)}
    quantized = quantize_kv_cache(lowered, 8, scales)
    proto = ir.to_proto(quantized)
    onnx.checker.check_model(proto)
    kv_inputs = [v for v in proto.graph.input if v.name.startswith("past_key_values.")]
    kv_outputs = [v for v in proto.graph.output if v.name.startswith("present.")]
    assert len(kv_inputs) == len(kv_outputs) == 2 * hf_config.num_hidden_layers
    assert {v.type.tensor_type.elem_type for v in kv_inputs + kv_outputs} == {TensorProto.INT8}
    initializers = {i.name: i for i in proto.graph.initializer}
    for node in (n for n in proto.graph.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
        assert list(node.input[12:14]) == [f"{node.input[3]}.scale", f"{node.input[4]}.scale"]
        assert list(initializers[node.input[12]].dims) == [1, KV_HEADS, 1, 32]
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # onnxruntime accepts it
    with pytest.raises(ValueError, match="scales must be positive"):
        quantize_kv_cache(ir.from_proto(ir.to_proto(lowered_tiny[1])), 8, {n: s * 0 for n, s in scales.items()})


def test_options_name_what_is_supported():
    assert kv_cache_bit_widths(get_target("ort-cpu").passes) == (8,)
    with pytest.raises(ValueError, match=r"does not support a 4-bit KV cache; supported kv_cache_bit_width: 0, 8"):
        CompileOptions(kv_cache_bit_width=4).validate()
    with pytest.raises(ValueError, match="needs the continuous KV cache strategy"):
        CompileOptions(kv_cache_bit_width=8, kv_cache_strategy=KVCacheStrategy.PAGED).validate()
    CompileOptions(kv_cache_bit_width=8).validate()
    assert CompileOptions(kv_cache_bit_width=8).to_json()["kv_cache_bit_width"] == 8  # part of the cache key


def test_a_target_without_groupqueryattention_has_no_integer_cache():
    import dataclasses

    other = dataclasses.replace(get_target("ort-cpu"), name="other", passes=())
    assert kv_cache_bit_widths(other.passes) == ()
