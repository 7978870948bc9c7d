"""ember's BERT-family encoder graph against transformers on tiny random BertModel, BertForMaskedLM,
RobertaModel and XLMRobertaModel checkpoints: last hidden state of the valid positions of a right-padded
batch within 1e-4 relative; the high-level graph valid (full check) and agreeing with onnxruntime through
the reference evaluator; checkpoint spellings and config errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from safetensors.torch import save_file
from transformers import AutoConfig, BertConfig, BertForSequenceClassification

from ember.graphs.architectures.bert import ARCHITECTURES, BertArchConfig
from ember.graphs.ir.custom import reference_evaluator_ops

from .tiny_encoders import VARIANTS, build, encoder_of, hf_last_hidden_state, make_model, padded_batch, session_for

RTOL = 1e-4
LENGTHS = (9, 4, 7)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    abs_err = float(np.abs(ours - reference).max())
    return abs_err, abs_err / float(np.abs(reference).max())


def assert_valid_positions_match(name, ours, reference, mask):
    valid = mask.astype(bool)
    abs_err, rel = relative_error(ours[valid], reference[valid])
    print(f"{name}: last_hidden_state max abs error {abs_err:.3g}, relative {rel:.3g}")
    assert rel < RTOL


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_model(request.param, directory)
    return request.param, directory, AutoConfig.from_pretrained(directory), hf_model


def test_last_hidden_state_matches_transformers(variant):
    name, directory, config, hf_model = variant
    session = session_for(build(config, directory))
    feeds = padded_batch(config, LENGTHS)
    (ours,) = session.run(None, feeds)
    assert ours.shape == (len(LENGTHS), max(LENGTHS), config.hidden_size)
    assert_valid_positions_match(name, ours, hf_last_hidden_state(hf_model, feeds), feeds["attention_mask"])


def test_high_level_graph_is_valid_and_agrees_with_onnxruntime(variant):
    name, directory, config, _ = variant
    high = ir.to_proto(build(config, directory))
    onnx.checker.check_model(high, full_check=True)
    assert {n.domain for n in high.graph.node} <= {""}, "the high-level encoder graph uses standard ops only"
    assert [i.name for i in high.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in high.graph.output] == ["last_hidden_state"]
    names = {n.name for n in high.graph.node}
    assert "/encoder/layer.1/attention/self/query/MatMul" in names
    assert "/encoder/layer.1/output/LayerNorm/LayerNormalization" in names
    assert "/embeddings/word_embeddings/Gather" in names
    feeds = padded_batch(config, LENGTHS, seed=1)
    (expected,) = ReferenceEvaluator(high, new_ops=reference_evaluator_ops()).run(None, feeds)
    (got,) = session_for(ir.from_proto(high)).run(None, feeds)
    valid = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-4, atol=1e-4)


def test_checkpoint_spellings_use_the_encoder_weights(tmp_path):
    """TensorFlow-era ``LayerNorm.gamma/beta`` names under ``bert.``, a pooler and an MLM head; and a
    ``BertForSequenceClassification`` checkpoint (pooler + classifier dropped)."""
    config = BertConfig(**{**VARIANTS["bert"][2], "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "intermediate_size": 64}, attn_implementation="eager")
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(1)
    classifier = BertForSequenceClassification(config).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    feeds = padded_batch(config, LENGTHS)
    reference = hf_last_hidden_state(classifier, feeds)
    loaded = AutoConfig.from_pretrained(tmp_path / "classifier")
    assert loaded.architectures == ["BertForSequenceClassification"]
    (ours,) = session_for(build(loaded, tmp_path / "classifier")).run(None, feeds)
    assert_valid_positions_match("bert-classifier", ours, reference, feeds["attention_mask"])

    tf_style = {}
    for key, value in encoder_of(classifier).state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        tf_style[f"bert.{key}"] = value.contiguous()
    tf_style["cls.predictions.bias"] = torch.zeros(config.vocab_size)
    tf_style["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    (tmp_path / "tf").mkdir()
    save_file(tf_style, tmp_path / "tf" / "model.safetensors")
    config.architectures = ["BertForMaskedLM"]
    (ours,) = session_for(build(config, tmp_path / "tf")).run(None, feeds)
    assert_valid_positions_match("bert-tf-names", ours, reference, feeds["attention_mask"])


def test_unsupported_configs_are_clear_errors():
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        BertArchConfig.from_hf(BertConfig(**base, position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported; supported: gelu, gelu_new"):
        BertArchConfig.from_hf(BertConfig(**base, hidden_act="relu"))
    config = BertConfig(**base)
    config.architectures = ["BertForQuestionAnswering"]
    with pytest.raises(ValueError, match="supported: BertModel"):
        BertArchConfig.from_hf(config)
    assert {"BertModel", "BertForMaskedLM", "BertForSequenceClassification", "RobertaModel",
            "XLMRobertaModel"} <= set(ARCHITECTURES)


def test_roberta_positions_follow_the_padding_index(variant):
    name, directory, config, _ = variant
    arch = BertArchConfig.from_hf(config)
    if name in ("roberta", "xlm-roberta"):
        assert arch.positions == "padding_offset" and arch.max_sequence_length == config.max_position_embeddings - 2
    else:
        assert arch.positions == "absolute" and arch.max_sequence_length == config.max_position_embeddings
