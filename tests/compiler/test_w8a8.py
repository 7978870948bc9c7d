"""The ``w8a8`` encoding (int8 weights per output channel x activations quantized at run time) on encoders:
the per-channel codes, the lowered graph (every weight MatMul an onnxruntime ``DynamicQuantizeMatMul``, bias
adds taken in), tiny random BERT / RoBERTa against transformers; and the
ort-cpu target's load setting that keeps onnxruntime's slower ``SkipLayerNormalization`` fusion off."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from transformers import AutoConfig

from ember.compiler.compile import CompileOptions, compile_graph
from ember.compiler.quantization.int8_channels import dequantize_per_channel, quantize_per_channel
from ember.compiler.targets import get_target
from ember.runtime.backends import OrtCpuBackend
from ember.runtime.session import InferenceSession

from ..graphs.bert.tiny_encoders import build, hf_last_hidden_state, make_model, padded_batch

LENGTHS = (9, 4, 7)


def test_per_channel_codes_round_to_nearest():
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, (48, 20)).astype(np.float32)
    weight[:, 3] = 0.0  # an all-zero output channel
    weight[5, 7] = 4.0  # an outlier owns its channel's scale only
    codes, scales = quantize_per_channel(weight)
    assert codes.dtype == np.int8 and codes.shape == (48, 20) and scales.shape == (20,)
    assert codes.min() >= -127 and codes.max() <= 127
    assert scales[3] == 1.0 and not codes[:, 3].any()
    np.testing.assert_allclose(scales[7], 4.0 / 127, rtol=1e-6)
    error = np.abs(dequantize_per_channel(codes, scales) - weight)
    assert (error <= scales[None, :] / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_channel(weight[0])


def ops_of(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


@pytest.fixture(scope="module", params=["bert", "roberta"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_model(request.param, directory)
    return request.param, directory, AutoConfig.from_pretrained(directory), hf_model


def lowered(config, directory, encoding: str) -> ir.Model:
    return get_target("ort-cpu").lower(build(config, directory), encoding)


def test_every_weight_matmul_is_dynamically_quantized(tiny):
    _, directory, config, _ = tiny
    float_ops, int8_ops = ops_of(lowered(config, directory, "float32")), ops_of(lowered(config, directory, "w8a8"))
    # per layer: the packed q|k|v, attention output, intermediate and output denses
    assert int8_ops["DynamicQuantizeMatMul"] == float_ops["MatMul"] == 4 * config.num_hidden_layers
    assert int8_ops["MatMul"] == 0
    # and each takes its bias add in
    assert int8_ops["Add"] == float_ops["Add"] - 4 * config.num_hidden_layers


def test_last_hidden_state_close_to_transformers(tiny):
    name, directory, config, hf_model = tiny
    feeds = padded_batch(config, LENGTHS)
    valid = feeds["attention_mask"].astype(bool)
    reference = hf_last_hidden_state(hf_model, feeds)[valid]
    errors = {}
    for encoding in ("float32", "w8a8"):
        proto = ir.to_proto(lowered(config, directory, encoding))
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        ours = session.run(None, feeds)[0][valid]
        errors[encoding] = float(np.abs(ours - reference).max() / np.abs(reference).max())
        cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
        print(f"{name} {encoding}: last_hidden_state relative error {errors[encoding]:.3g}, "
              f"min cosine per token {cosine.min():.6f}")
    assert errors["float32"] < 1e-4
    # random tiny weights and 9-token rows: noisier than a trained model (MiniLM: min cosine 0.98 per sentence)
    assert errors["w8a8"] < 0.2 and cosine.min() > 0.98


def ops_in(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _dumping_session(path) -> InferenceSession:
    """A session whose onnxruntime backend writes the graph it optimized at load to ``path``, to see which
    fusions it applied (the artifact's load settings applied as the real backend applies them)."""
    class Dumping(OrtCpuBackend):
        def session_options(self) -> ort.SessionOptions:
            options = super().session_options()
            options.optimized_model_filepath = str(path)
            return options

    return InferenceSession(num_threads=1, backends={OrtCpuBackend.name: Dumping})


def test_ort_cpu_artifacts_load_without_the_skip_layer_norm_fusion(tmp_path):
    directory = tmp_path / "bert"
    make_model("bert", directory)
    config = AutoConfig.from_pretrained(directory)
    artifact = compile_graph(build(config, directory), tmp_path / "artifact", CompileOptions(),
                             {"architecture": "BertModel"})
    assert artifact.manifest["session"] == {"disabled_optimizers": ["SkipLayerNormFusion"]}
    optimized = tmp_path / "optimized.onnx"
    _dumping_session(optimized).load(artifact)
    loaded_ops = ops_in(optimized)
    assert loaded_ops["SkipLayerNormalization"] == 0 and loaded_ops["LayerNormalization"] >= 4
    # the control: onnxruntime left to itself fuses them (so the setting is what keeps them apart)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(artifact.rank_model(0)), options, providers=["CPUExecutionProvider"])
    fused_ops = ops_in(tmp_path / "fused.onnx")
    assert fused_ops["SkipLayerNormalization"] == 2 * config.num_hidden_layers
