"""Hostile or broken model files, crafted here: each is refused with one ValueError that names the file and the
field, tensor or key, before any graph is built (ember issue 17).

safetensors headers that lie about the file, GGUF metadata that is missing or absurd, config values no graph can be
built from, checkpoints whose tensors do not match their config.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ember.graphs.architectures.bert.config import BertArchConfig
from ember.graphs.architectures.bert.config import check_config_json as check_bert_config_json
from ember.graphs.architectures.llama import SAFETENSORS_RULES, LlamaArchConfig
from ember.graphs.architectures.llama.config import (MAX_POSITIONS, check_checkpoint, check_config_json,
                                                     hf_config_from_gguf)
from ember.graphs.nn.rotary import RopeScaling
from ember.graphs.weights import AdaptedWeights, SafetensorsWeights

# A tiny Llama: 2 layers, 4 heads of 8 over 2 KV heads, hidden 32, vocabulary 48.
HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, INTERMEDIATE = 32, 4, 2, 2, 48, 64
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN,
              intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=True)


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file as the format defines it: u64 header length, JSON header (space-padded), data."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def llama_tensors(layers: int = LAYERS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    tensors = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)), "model.norm.weight": np.ones(HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors.update({
            f"{p}.input_layernorm.weight": np.ones(HIDDEN), f"{p}.post_attention_layernorm.weight": np.ones(HIDDEN),
            f"{p}.self_attn.q_proj.weight": rng.standard_normal((HIDDEN, HIDDEN)) * 0.1,
            f"{p}.self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * head_dim, HIDDEN)) * 0.1,
            f"{p}.self_attn.v_proj.weight": rng.standard_normal((KV_HEADS * head_dim, HIDDEN)) * 0.1,
            f"{p}.self_attn.o_proj.weight": rng.standard_normal((HIDDEN, HIDDEN)) * 0.1,
            f"{p}.mlp.gate_proj.weight": rng.standard_normal((INTERMEDIATE, HIDDEN)) * 0.1,
            f"{p}.mlp.up_proj.weight": rng.standard_normal((INTERMEDIATE, HIDDEN)) * 0.1,
            f"{p}.mlp.down_proj.weight": rng.standard_normal((HIDDEN, INTERMEDIATE)) * 0.1})
    return tensors


def write_tiny_llama(directory: Path, config: dict | None = None, layers: int = LAYERS) -> Path:
    """A complete model folder made with numpy and ``tokenizers`` alone: config.json, model.safetensors, a
    word-level tokenizer with a one-line chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    (directory / "model.safetensors").write_bytes(safetensors_bytes(llama_tensors(layers)))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))
    return directory


# --- safetensors -------------------------------------------------------------------------------------------

def _one_tensor_file(tmp_path: Path) -> tuple[Path, bytes]:
    good = safetensors_bytes({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return tmp_path / "model.safetensors", good


def _with_header(header: object, data: bytes = b"\0" * 24) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text)) + text + data


HEADER_CASES = {
    "header length past the end": (lambda good: struct.pack("<Q", 2 ** 62) + good[8:],
                                   r"header length 4611686018427387904 runs past the end of the file"),
    "header length 2**64-1": (lambda good: b"\xff" * 8 + good[8:], r"header length \d+ runs past the end"),
    "shorter than 8 bytes": (lambda good: good[:5], r"not a safetensors file \(5 bytes"),
    "header not JSON": (lambda good: _with_header(b"{not json"), r"header is not valid JSON"),
    "header not UTF-8": (lambda good: _with_header(b"\xff\xfe"), r"header is not valid JSON"),
    "header a list": (lambda good: _with_header([1, 2]), r"header is a JSON list, not an object"),
    "metadata not an object": (lambda good: _with_header({"__metadata__": [1]}), r"__metadata__ is not an object"),
    "entry not an object": (lambda good: _with_header({"w": 5}), r"tensor 'w': header entry is not an object"),
    "unknown dtype": (lambda good: _with_header({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}),
                      r"tensor 'w': unknown safetensors dtype 'Q9'"),
    "negative dim": (lambda good: _with_header({"w": {"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 24]}}),
                     r"tensor 'w': shape \[-2, 3\] is not a list"),
    "dim a string": (lambda good: _with_header({"w": {"dtype": "F32", "shape": ["6"], "data_offsets": [0, 24]}}),
                     r"tensor 'w': shape \['6'\] is not a list"),
    "huge shape": (lambda good: _with_header({"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40],
                                                    "data_offsets": [0, 24]}}),
                   r"tensor 'w': F32 \[1099511627776, 1099511627776\] takes \d+ bytes but data_offsets \[0, 24\] "
                   r"span 24"),
    "offsets reversed": (lambda good: _with_header({"w": {"dtype": "F32", "shape": [6], "data_offsets": [24, 0]}}),
                         r"tensor 'w': data_offsets \[24, 0\] is not a \[begin, end\] pair"),
    "offsets not a pair": (lambda good: _with_header({"w": {"dtype": "F32", "shape": [6], "data_offsets": [0]}}),
                           r"data_offsets \[0\] is not a \[begin, end\] pair"),
    "shape and span disagree": (lambda good: _with_header({"w": {"dtype": "F32", "shape": [2, 3],
                                                                 "data_offsets": [0, 20]}}),
                                r"tensor 'w': F32 \[2, 3\] takes 24 bytes but data_offsets \[0, 20\] span 20"),
    "truncated data": (lambda good: good[:-4], r"tensor 'w': data ends at byte 24 of the data section, which has "
                                               r"only 20 bytes \(truncated\?\)"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_safetensors_header_that_lies_is_refused_naming_file_and_tensor(tmp_path, case):
    path, good = _one_tensor_file(tmp_path)
    make, match = HEADER_CASES[case]
    path.write_bytes(make(good))
    with pytest.raises(ValueError, match=match) as info:
        SafetensorsWeights(tmp_path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_safetensors_good_file_still_loads(tmp_path):
    """The checks pass a well-formed file, zero-size tensors included, and its values are the ones written."""
    path, good = _one_tensor_file(tmp_path)
    path.write_bytes(good)
    weights = SafetensorsWeights(tmp_path)
    np.testing.assert_array_equal(weights.load("w"), np.arange(6, dtype=np.float32).reshape(2, 3))
    path.write_bytes(_with_header({"empty": {"dtype": "F16", "shape": [0, 4], "data_offsets": [0, 0]}}, b""))
    assert SafetensorsWeights(tmp_path).load("empty").shape == (0, 4)


def test_safetensors_unsupported_dtype_named_on_load(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(
        _with_header({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4))
    weights = SafetensorsWeights(tmp_path)  # a valid file: the dtype is refused when the tensor is used
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'w': safetensors dtype F8_E4M3 is not "
                                         r"supported"):
        weights.load("w")


def test_safetensors_index_refuses_paths_out_of_the_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(safetensors_bytes({"w": np.ones(2)}))
    index = model / "model.safetensors.index.json"
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), ".."):
        index.write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(ValueError, match=rf"index\.json: shard '{shard}' is not a file name in the model folder"):
            SafetensorsWeights(model)


def test_safetensors_index_broken(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{")
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        SafetensorsWeights(tmp_path)
    index.write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(ValueError, match=r"index\.json: weight_map is not an object"):
        SafetensorsWeights(tmp_path)
    index.write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"index\.json names shard model-00001\.safetensors, which is not in"):
        SafetensorsWeights(tmp_path)


def test_safetensors_same_tensor_in_two_shards(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(safetensors_bytes({"w": np.ones(2)}))
    with pytest.raises(ValueError, match=r"b\.safetensors: tensor 'w' is also in a\.safetensors"):
        SafetensorsWeights(tmp_path)


# --- config.json -------------------------------------------------------------------------------------------

def llama_config(tmp_path: Path, **changes):
    """A LlamaConfig read back from a config.json (as ember reads a model folder's), with ``changes`` (None drops
    a field)."""
    from transformers import AutoConfig

    data = {**CONFIG, **changes}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return AutoConfig.from_pretrained(tmp_path, trust_remote_code=False)


def plain_config(tmp_path: Path, **changes):
    """The same fields in a plain ``PretrainedConfig`` (as ember reads an artifact's config.json without a
    model_type): transformers' own type and divisibility checks do not run, only ember's."""
    from transformers import PretrainedConfig

    data = {**CONFIG, **changes}
    rope = data.pop("rope_scaling", None)
    config = PretrainedConfig(**{k: v for k, v in data.items() if k != "model_type"}, name_or_path=str(tmp_path))
    if rope is not None:
        config.rope_parameters = rope
    return config


CONFIG_CASES = {
    "heads a string": (dict(num_attention_heads="4"), r"num_attention_heads must be a positive integer, not '4'"),
    "zero layers": (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive integer, not 0"),
    "heads do not divide hidden": (dict(num_attention_heads=3, num_key_value_heads=3),
                                   r"hidden_size 32 is not a multiple of num_attention_heads 3"),
    "kv heads do not divide heads": (dict(num_key_value_heads=3),
                                     r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "more heads than hidden": (dict(num_attention_heads=64, num_key_value_heads=1),
                               r"num_attention_heads 64 is larger than 32"),
    "head_dim 1": (dict(num_attention_heads=32, num_key_value_heads=1),
                   r"head_dim 1 \(hidden_size 32 / num_attention_heads 32\) leaves no room for rotary"),
    "context 2**31-1": (dict(max_position_embeddings=2 ** 31 - 1),
                        rf"max_position_embeddings 2147483647 is larger than {MAX_POSITIONS:,}"),
    "negative eps": (dict(rms_norm_eps=-1.0), r"rms_norm_eps must be a positive number, not -1\.0"),
    "rope theta zero": (dict(rope_theta=0), r"rope_theta must be a positive number, not 0"),
    "unknown activation": (dict(hidden_act="swish9"), r"hidden_act 'swish9' is not supported"),
    "linear rope without factor": (dict(rope_scaling={"rope_type": "linear"}),
                                   r"rope scaling 'linear' needs factor as a positive number, not None"),
    "negative eos": (dict(eos_token_id=-5), r"eos_token_id -5 is not a token id"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_llama_config_values_no_graph_can_use_are_refused(tmp_path, case):
    changes, match = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=match) as info:
        LlamaArchConfig.from_hf(plain_config(tmp_path, **changes))
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["zero layers", "kv heads do not divide heads", "context 2**31-1", "negative eps",
                                  "negative eos"])
def test_llama_config_values_transformers_accepts_are_refused(tmp_path, case):
    """The same checks on a model folder's config as transformers reads it (it lets these values through)."""
    changes, match = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=match):
        LlamaArchConfig.from_hf(llama_config(tmp_path, **changes))


def test_llama_config_good_values_pass(tmp_path):
    config = LlamaArchConfig.from_hf(llama_config(tmp_path))
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers) == (4, 2, 8, 2)


@pytest.mark.parametrize("field", ["num_attention_heads", "num_hidden_layers", "hidden_size"])
def test_config_json_missing_field_named(tmp_path, field):
    """transformers fills a missing field with its class default (32 heads, 32 layers): only config.json's own
    content can tell that the field is missing."""
    data = {k: v for k, v in CONFIG.items() if k != field}
    with pytest.raises(ValueError, match=rf"^config\.json: {field} is missing$"):
        check_config_json(data, "config.json")
    check_config_json(CONFIG, "config.json")


def test_config_json_architectures_a_string(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json: architectures must be a list of class names, not "
                                         r"'LlamaForCausalLM'"):
        check_config_json({**CONFIG, "architectures": "LlamaForCausalLM"}, "config.json")
    with pytest.raises(ValueError, match=r"config\.json: not a JSON object"):
        check_config_json(["LlamaForCausalLM"], "config.json")


def test_bert_config_checks(tmp_path):
    from transformers import BertConfig, PretrainedConfig

    with pytest.raises(ValueError, match=r"bert/config\.json: max_position_embeddings is missing"):
        check_bert_config_json({"architectures": ["BertModel"], "vocab_size": 30, "hidden_size": 8,
                                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
                               "bert/config.json")
    for changes, match in ((dict(num_attention_heads=3), r"hidden_size 8 is not a multiple of num_attention_heads 3"),
                           (dict(num_hidden_layers=-1), r"num_hidden_layers must be an integer of at least 1"),
                           (dict(pad_token_id=99), r"pad_token_id 99 is not a token id below vocab_size 30"),
                           (dict(layer_norm_eps=float("nan")), r"layer_norm_eps must be a positive number")):
        fields = {**dict(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=0, max_position_embeddings=512,
                         architectures=["BertModel"]), **changes}
        config = PretrainedConfig(**fields, name_or_path=str(tmp_path))  # as an artifact's config.json is read
        with pytest.raises(ValueError, match=match) as info:
            BertArchConfig.from_hf(config)
        assert str(info.value).startswith(f"{tmp_path / 'config.json'}: ")
    good = BertArchConfig.from_hf(BertConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, pad_token_id=0))
    assert (good.head_dim, good.max_sequence_length) == (4, 512)


def test_rope_scaling_parameters_checked():
    with pytest.raises(ValueError, match=r"'llama3' needs low_freq_factor as a positive number, not None"):
        RopeScaling.from_hf({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match=r"needs different low_freq_factor and high_freq_factor"):
        RopeScaling.from_hf({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})
    assert RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0}).params == {"factor": 2.0}


# --- a checkpoint against its config -----------------------------------------------------------------------

@pytest.mark.parametrize("layers, match", [
    (5, r"the config's num_hidden_layers is 5 but the checkpoint has layers 0\.\.1 \(2 layers\)"),
    (32, r"num_hidden_layers is 32 but the checkpoint has layers 0\.\.1"),  # the default when it is missing
    (1, r"num_hidden_layers is 1 but the checkpoint has layers 0\.\.1")])
def test_checkpoint_layer_count_must_match(tmp_path, layers, match):
    write_tiny_llama(tmp_path)
    config = LlamaArchConfig.from_hf(llama_config(tmp_path, num_hidden_layers=layers))
    weights = AdaptedWeights(SafetensorsWeights(tmp_path), SAFETENSORS_RULES)
    with pytest.raises(ValueError, match=match) as info:
        check_checkpoint(config, weights)
    assert str(info.value).startswith(f"{tmp_path}: ")


def test_checkpoint_shapes_must_match_heads(tmp_path):
    """A config whose heads do not fit the projections (here: a missing num_key_value_heads read as 4) is named
    with the tensor and the fields, not left to an onnxruntime shape error after compiling."""
    write_tiny_llama(tmp_path)
    weights = AdaptedWeights(SafetensorsWeights(tmp_path), SAFETENSORS_RULES)
    check_checkpoint(LlamaArchConfig.from_hf(llama_config(tmp_path)), weights)
    config = LlamaArchConfig.from_hf(llama_config(tmp_path, num_key_value_heads=None))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \[16, 32\], "
                                         r"but the config's num_key_value_heads \* head_dim x hidden_size is "
                                         r"\[32, 32\]"):
        check_checkpoint(config, weights)
    config = LlamaArchConfig.from_hf(llama_config(tmp_path, vocab_size=64))
    with pytest.raises(ValueError, match=r"tensor model\.embed_tokens\.weight has shape \[48, 32\], but the "
                                         r"config's vocab_size x hidden_size is \[64, 32\]"):
        check_checkpoint(config, weights)


# --- GGUF metadata -----------------------------------------------------------------------------------------

def write_gguf(path: Path, drop: tuple[str, ...] = (), blocks: int = 2, **values) -> Path:
    """A small llama GGUF: metadata (``values`` override, ``drop`` removes keys) and one F32 tensor per block."""
    gguf = pytest.importorskip("gguf")

    metadata = {"llama.block_count": blocks, "llama.context_length": 256, "llama.embedding_length": 64,
                "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.vocab_size": 8,
                "tokenizer.ggml.tokens": [f"t{i}" for i in range(8)], "tokenizer.ggml.eos_token_id": 2}
    metadata.update({k.replace("__", "."): v for k, v in values.items()})
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if key in drop:
            continue
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint64(key, value) if value >= 0 else writer.add_int64(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    for i in range(blocks):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_config(path: Path):
    from ember.graphs.weights.gguf import GGUFWeights

    weights = GGUFWeights(path)
    return hf_config_from_gguf(weights.metadata, weights.keys(), path)


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.attention.head_count", "llama.block_count",
                                 "llama.feed_forward_length"])
def test_gguf_missing_required_key_named(tmp_path, key):
    path = write_gguf(tmp_path / "m.gguf", drop=(key,))
    with pytest.raises(ValueError, match=rf"^{path}: GGUF metadata {key} is missing$"):
        gguf_config(path)


GGUF_CASES = {
    "context 2**31-1": (dict(llama__context_length=2 ** 31 - 1),
                        rf"llama\.context_length 2147483647 is larger than {MAX_POSITIONS:,}"),
    "heads do not divide": (dict(llama__attention__head_count=3, llama__attention__head_count_kv=3),
                            r"llama\.embedding_length 64 is not a multiple of llama\.attention\.head_count 3"),
    "kv heads do not divide": (dict(llama__attention__head_count_kv=3),
                               r"llama\.attention\.head_count 4 is not a multiple of "
                               r"llama\.attention\.head_count_kv 3"),
    "per-layer head counts": (dict(llama__attention__head_count=[4, 4]),
                              r"llama\.attention\.head_count must be a positive integer, not \[4, 4\]"),
    "zero width": (dict(llama__feed_forward_length=0), r"llama\.feed_forward_length must be a positive integer"),
    "more blocks than tensors": (dict(llama__block_count=5),
                                 r"llama\.block_count is 5 but the file has blocks 0\.\.1 \(2 blocks\)"),
    "eos past the vocabulary": (dict(tokenizer__ggml__eos_token_id=1000),
                                r"tokenizer\.ggml\.eos_token_id 1000 is not a token id below the vocabulary size 8"),
    "rope scaling yarn": (dict(llama__rope__scaling__type="yarn"),
                          r"llama\.rope\.scaling\.type 'yarn' is not supported"),
    "negative rope base": (dict(llama__rope__freq_base=-1.0), r"llama\.rope\.freq_base must be a positive number"),
    "value length differs": (dict(llama__attention__value_length=32),
                             r"llama\.attention\.value_length 32 differs from the key length 16"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_absurd_metadata_refused(tmp_path, case):
    values, match = GGUF_CASES[case]
    path = write_gguf(tmp_path / "m.gguf", **values)
    with pytest.raises(ValueError, match=match) as info:
        gguf_config(path)
    assert str(info.value).startswith(f"{path}: GGUF metadata ")


def test_gguf_good_metadata_builds_its_config(tmp_path):
    config = gguf_config(write_gguf(tmp_path / "m.gguf"))
    assert (config.num_hidden_layers, config.num_attention_heads, config.head_dim,
            config.max_position_embeddings) == (2, 4, 16, 256)
    assert LlamaArchConfig.from_hf(config).num_kv_heads == 2
