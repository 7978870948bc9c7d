"""``ember bench`` for text generation: several encodings in one run, batched decoding, the memory-bandwidth
columns, and the ort-genai peer's preparation. Real components on tiny random Llamas (no mocks); the real
SmolLM2 and the ort-genai build are left to the benchmark itself (minutes, not seconds)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ember.tools.bench import agreement
from ember.tools.bench_bandwidth import artifact_model, bandwidth_fraction, copy_bandwidth, weight_bytes_per_step
from ember.tools.cli import build_parser, main

pytest.importorskip("torch")
from tests.reference.tiny_models import make_model  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> Path:
    directory = tmp_path_factory.mktemp("ember-cache")
    monkeypatch.setenv("EMBER_CACHE", str(directory))
    return directory


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    """Tied embeddings: the output head reads the embedding table, so a decode step streams it."""
    directory = tmp_path_factory.mktemp("tiny-tied")
    make_model("llama-gqa-llama3", directory)
    return directory


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    """An untied output head: the embedding table is only gathered."""
    directory = tmp_path_factory.mktemp("tiny-untied")
    make_model("llama-mqa-linear", directory)
    return directory


def _compile(model: Path, encoding: str) -> Path:
    from ember.tools.compile_model import compile_model

    return compile_model(model, encoding=encoding).path


def _checkpoint_matrix_bytes(model: Path) -> tuple[int, int]:
    """(bytes of the checkpoint's projection and output-head matrices, bytes of its embedding table)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(model / "model.safetensors"))
    embedding = tensors["model.embed_tokens.weight"].nbytes
    matrices = sum(t.nbytes for name, t in tensors.items() if t.ndim == 2 and name != "model.embed_tokens.weight")
    return matrices, embedding


def test_copy_bandwidth_is_positive():
    result = copy_bandwidth(mib=8, repeats=2, threads=2)
    assert result["gb_s"] > 0 and len(result["rates"]) == 2 and result["min"] <= result["gb_s"] <= result["max"]
    assert result["counts"] == "read + write"
    with pytest.raises(ValueError):
        copy_bandwidth(mib=0)


def test_bandwidth_fraction():
    assert bandwidth_fraction(10**9, 5.0, 20.0) == pytest.approx(0.25)
    assert bandwidth_fraction(None, 5.0, 20.0) is None and bandwidth_fraction(10, None, 20.0) is None


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_float32_bytes_per_step_are_the_checkpoint_matrices(variant, request):
    """Independently of the graph: every projection and the output head, 4 bytes per weight; the embedding
    table counts only when the tied head reads it (ember fuses q|k|v and gate|up, which keeps the bytes)."""
    model = request.getfixturevalue(variant)
    matrices, embedding = _checkpoint_matrix_bytes(model)
    expected = matrices + (embedding if variant == "tied" else 0)
    assert weight_bytes_per_step(artifact_model(_compile(model, "float32"))) == expected


def test_quantized_bytes_per_step_sum_the_product_initializers(untied):
    """q8_0: the bytes of the arrays the matrix products read (loaded with their external data), about a
    quarter of float32's plus the block scales."""
    import onnx
    from onnx import numpy_helper

    path = artifact_model(_compile(untied, "q8_0"))
    model = onnx.load(str(path))  # with the external data, this time
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    read = {name for node in model.graph.node if node.op_type in ("MatMul", "MatMulNBits", "Gemm")
            for name in node.input if name in arrays}
    assert weight_bytes_per_step(path) == sum(arrays[name].nbytes for name in read)
    matrices, _ = _checkpoint_matrix_bytes(untied)
    assert matrices / 4 < weight_bytes_per_step(path) < matrices / 3


def test_cli_parses_encoding_lists_and_batch_size():
    parser = build_parser()
    args = parser.parse_args(["bench", "--encoding", "float32,q8_0,float32", "--batch-size", "8"])
    assert args.encoding == ["float32", "q8_0"] and args.batch_size == 8
    assert parser.parse_args(["bench", "--encoding", "q4_0"]).encoding == ["q4_0"]
    assert parser.parse_args(["bench", "--compare", "ort-genai"]).compare == "ort-genai"
    for bad in (["--encoding", "float32,nope"], ["--encoding", "float32,"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as error:
            parser.parse_args(["bench", *bad])
        assert error.value.code == 2


def test_unsupported_encoding_fails_with_the_loaders_error(untied, capsys):
    assert main(["bench", str(untied), "--encoding", "float32,bfloat16", "--runs", "1"]) == 1
    err = capsys.readouterr().err
    assert "ember: error:" in err and "does not support encoding 'bfloat16'" in err


def test_compare_ort_genai_without_the_package_says_how_to_install(untied, tmp_path):
    """The package blocked from import (as where it is not installed): a clear error before any loading."""
    code = ("import sys; sys.modules['onnxruntime_genai'] = None; from ember.tools.cli import main; "
            f"sys.exit(main(['bench', {str(untied)!r}, '--compare', 'ort-genai']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "EMBER_CACHE": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert "pip install 'ember[bench]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "artifacts").exists()  # nothing was compiled


def test_bench_measures_each_encoding_at_batch_2(tied, tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    assert main(["bench", str(tied), "--encoding", "float32,q8_0", "--batch-size", "2", "--runs", "1",
                 "--warmup", "0", "--prompt-tokens", "4", "--new-tokens", "4", "--bandwidth-mib", "8",
                 "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    for text in ("ember float32", "ember q8_0", "TTFT (ms)", "decode (tok/s)", "weights/step", "of bw",
                 "bandwidth:", "batch 2", "greedy:   ember q8_0 vs ember float32"):
        assert text in out
    report = json.loads(report_path.read_text())
    assert list(report["encodings"]) == ["float32", "q8_0"] and report["batch_size"] == 2
    assert report["ember"] == report["encodings"]["float32"]  # the first encoding, as before lists
    assert report["bandwidth"]["gb_s"] > 0 and report["bandwidth"]["copies"] == 6
    for data in report["encodings"].values():
        assert data["generated_tokens"] == [4] and data["batch_rows_agree"]
        assert data["decode_tok_s"]["median"] == pytest.approx(2 * data["decode_tok_s_per_seq"]["median"])
        assert data["ttft_s"]["median"] > 0 and data["bandwidth_fraction"] > 0
    f32, q8 = report["encodings"]["float32"], report["encodings"]["q8_0"]
    assert q8["weight_bytes_per_step"] < f32["weight_bytes_per_step"] / 3
    assert report["greedy_agreement"]["reference"] == "ember float32"
    q8_agreement = report["greedy_agreement"]["runners"]["ember q8_0"]
    assert q8_agreement["of"] == q8_agreement["teacher_forced_of"] == 4
    assert q8_agreement["teacher_forced_equal"] >= q8_agreement["matching_prefix"]


def test_agreement_counts_prefix_positions_and_forced_steps():
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"matching_prefix": 2, "equal_positions": 3, "of": 4}
    assert agreement([1, 2], [1, 2, 3]) == {"matching_prefix": 2, "equal_positions": 2, "of": 2}
    forced = agreement([1, 2, 3, 4], [1, 5, 6, 7], forced=[1, 5, 3, 4])
    assert forced["matching_prefix"] == 1 and (forced["teacher_forced_equal"], forced["teacher_forced_of"]) == (3, 4)


def test_ember_forced_argmax_reproduces_its_own_greedy_tokens(untied):
    """Fed its own greedy sequence, the pipeline chooses that sequence at every step (and frees its slot)."""
    from ember.tools.bench import EmberRunner
    from ember.tools.loading import load_pipeline, pipeline_config

    runner = EmberRunner(load_pipeline(pipeline_config(untied, max_length=32)))
    prompt = [1, 5, 9, 12]
    greedy = runner.run(prompt, 8).tokens
    assert runner.forced_argmax(prompt, greedy) == greedy
    assert runner.pipeline.pipeline_model.kv_manager.free_slots == 1


def test_ort_genai_builder_runs_offline_from_a_local_folder(untied, cache):
    """The builder reads the local folder (``-i``, never a hub name with ``-m``) with the hub offline; an HF
    folder is used as it is, and the cache key follows the bytes of the model."""
    from ember.runtime.pipelines import ModelSource
    from ember.tools.bench_ort_genai import builder_command, builder_env, hf_checkpoint, source_key

    command = builder_command(untied, cache / "out", cache / "work")
    assert command[1:3] == ["-m", "onnxruntime_genai.models.builder"] and "-m" not in command[3:]
    flags = dict(zip(command[3::2], command[4::2]))
    assert flags == {"-i": str(untied), "-o": str(cache / "out"), "-p": "int4", "-e": "cpu", "-c": str(cache / "work")}
    env = builder_env({"PATH": "/bin"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1" and env["PATH"] == "/bin"
    source = ModelSource.resolve(untied)
    assert hf_checkpoint(source, cache) == source.path
    key = source_key(source, cache)
    assert key == source_key(source, cache) and key.endswith(f"-{sum(f.stat().st_size for f in source.files())}")
    with pytest.raises(ValueError, match="source weights"):
        hf_checkpoint(ModelSource.resolve(_compile(untied, "float32")), cache)


def test_weight_bytes_ignore_gather_only_initializers(tmp_path):
    """A graph built by hand: the gathered table is not counted, the product's weight and bias are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((4, 3), np.float16), "weight")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "bias")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]),
             helper.make_node("Gemm", ["x", "weight", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[table, weight, bias])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert weight_bytes_per_step(tmp_path / "m.onnx") == 4 * 3 * 2 + 3 * 4


def test_encodings_of_an_artifact_must_be_its_own(untied):
    from ember.tools.bench import check_encodings

    artifact = _compile(untied, "float32")
    assert check_encodings(artifact, ["float32"]) == ["float32"]
    assert check_encodings(untied, None) == [None]
    for encodings in (["q8_0"], ["float32", "q8_0"]):
        with pytest.raises(ValueError, match="compiled with float32"):
            check_encodings(artifact, encodings)
