"""The runtime backend seam (issue 11): the onnxruntime-CPU backend's buffers, views, row copies and runs on real
onnxruntime; the manifest's runtime block; a backend the build does not have, or devices of another kind, refused
with one clear line; and a second backend plugged in through the table alone carries a whole decoder pipeline."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ember.compiler.artifact import update_manifest
from ember.runtime.backends import BACKENDS, OrtCpuBackend, backend_for, runtime_of
from ember.runtime.pipelines import PIPELINE_REGISTRY, DecoderPipelineModel, PipelineConfig, TextGenerationPipeline
from ember.runtime.session import Device, InferenceSession

from ..reference.tiny_models import make_model

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def test_cpu_buffers_views_and_row_copies():
    backend = OrtCpuBackend()
    buffer = backend.allocate((4, 3, 5), np.float32)
    host = backend.to_host(buffer)
    assert host.shape == (4, 3, 5) and not host.any() and buffer.nbytes == 4 * 3 * 5 * 4
    host[:] = np.arange(60, dtype=np.float32).reshape(4, 3, 5)
    before = host.copy()
    backend.copy_rows(buffer, [0], [2], (slice(None), slice(0, 2)))  # a slot move, the first two positions
    assert np.array_equal(host[0, :, :2], before[2, :, :2]) and np.array_equal(host[0, :, 2:], before[0, :, 2:])
    backend.copy_rows(buffer, [1, 3], [3, 1])  # a swap reads before it writes
    assert np.array_equal(host[1], before[3]) and np.array_equal(host[3], before[1])
    assert backend.view(buffer, 1, 3).shape() == [2, 3, 5]
    assert np.shares_memory(backend.to_host(buffer, 1, 3), host)


def _add_one_model(path: Path) -> Path:
    """``y = x + 1`` and ``state_out = state + x`` (the output bound to the input's buffer: written in place)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    state_out = helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, 3])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"]),
                               helper.make_node("Add", ["state", "x"], ["state_out"])],
                              "g", [x, state], [y, state_out], [one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_cpu_run_graph_updates_in_place(tmp_path):
    backend = OrtCpuBackend()
    state = np.ones((2, 3), np.float32)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    backend.run_graph(_add_one_model(tmp_path / "m.onnx"), {"x": x}, {"state": ("state_out", state)})
    assert np.array_equal(state, 1 + x)


def test_a_loaded_model_holds_the_views_it_binds_and_rebinds_new_ones(tmp_path):
    """Views made and dropped step after step: each new one is bound (never taken for the last one by an id() that
    came back), and a bound view lives as long as its binding."""
    import gc
    import weakref

    backend = OrtCpuBackend()
    model = backend.load_file(_add_one_model(tmp_path / "m.onnx"))
    model.bind_input("x", np.ones((2, 3), np.float32))
    model.bind_output_to_host("y")
    buffers = [backend.allocate((2, 3), np.float32) for _ in range(4)]
    for step, buffer in enumerate(buffers):
        view = backend.view(buffer)
        model.bind_buffer("state", view)
        model.bind_buffer("state_out", view, output=True)
        held = weakref.ref(view)
        del view
        gc.collect()
        assert held() is not None  # the binding holds it
        model.run()
        assert np.array_equal(backend.to_host(buffer), np.ones((2, 3)))  # this step's buffer, written in place
        assert all(not backend.to_host(b).any() for b in buffers[step + 1:])


def test_unknown_backend_and_other_devices_are_refused():
    with pytest.raises(ValueError, match=r"needs runtime backend 'vulkan', which this ember does not have; "
                                         r"available: onnxruntime-cpu, onnxruntime-cuda, tensorrt"):
        backend_for({"runtime": {"backend": "vulkan", "device_kind": "vulkan"}}, 1)
    with pytest.raises(ValueError, match=r"devices rocm:0: this build runs on cpu, cuda only"):
        InferenceSession([Device("rocm", 0)])


def test_manifest_runtime_block_and_older_manifests(tmp_path):
    make_model("llama-gqa-llama3", tmp_path / "model")
    config = PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path / "cache", max_batch_size=1)
    artifact = PIPELINE_REGISTRY.resolve(config).artifact
    manifest = artifact.manifest
    assert runtime_of(manifest) == {"backend": "onnxruntime-cpu", "device_kind": "cpu",
                                    "settings": {"providers": ["CPUExecutionProvider"], **manifest["session"]}}
    assert manifest["devices"] == ["cpu"] and manifest["ranks"][0]["device"] == "cpu"
    older = {k: v for k, v in manifest.items() if k != "runtime"}  # written before the block existed
    assert runtime_of(older) == runtime_of(manifest)
    update_manifest(artifact.path, {"runtime": {**manifest["runtime"], "device_kind": "cuda"}})
    with pytest.raises(ValueError, match="was compiled for cuda devices; this session has cpu:0"):
        InferenceSession(num_threads=1).load(artifact.path)


def test_threads_above_the_cpus_are_capped_with_a_warning(caplog):
    import os

    cpus = len(os.sched_getaffinity(0))
    with caplog.at_level("WARNING"):
        session = InferenceSession(num_threads=1000)
    assert session.num_threads == cpus and f"--threads 1000 capped to {cpus}" in caplog.text


class CountingBackend(OrtCpuBackend):
    """A second backend, plugged in through the table alone: the CPU one, counting what it is asked for."""

    name = "counting-cpu"
    allocations: list[tuple] = []

    def allocate(self, shape, dtype):
        CountingBackend.allocations.append(tuple(shape))
        return super().allocate(shape, dtype)


def test_a_second_backend_carries_a_decoder_through_the_table(tmp_path):
    """A manifest naming another backend loads through it, and every buffer the decoder uses (KV cache, logits)
    comes from it: nothing in the pipeline allocates for itself."""
    make_model("llama-gqa-llama3", tmp_path / "model")
    config = PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path / "cache", max_batch_size=2)
    resolved = PIPELINE_REGISTRY.resolve(config)
    expected = PIPELINE_REGISTRY.build_pipeline(resolved).generate_tokens([[1, 5, 9, 7]])[0]
    artifact = update_manifest(resolved.artifact.path, {"runtime": {**resolved.manifest["runtime"],
                                                                    "backend": "counting-cpu"}})
    CountingBackend.allocations.clear()
    session = InferenceSession(num_threads=1, backends={**BACKENDS, CountingBackend.name: CountingBackend})
    model = DecoderPipelineModel(config, session, resolved=dataclasses.replace(resolved, artifact=artifact))
    assert type(model.model.backend) is CountingBackend
    layers = resolved.huggingface_config["num_hidden_layers"]
    assert len(CountingBackend.allocations) == 2 * layers + 1  # K and V per layer, and the logits
    pipeline = TextGenerationPipeline(config, model, eos_token_id=None)
    assert pipeline.generate_tokens([[1, 5, 9, 7]])[0] == expected


def test_an_int8_kv_cache_compile_without_a_backend_to_calibrate_on_is_refused_before_lowering(tmp_path):
    from ember.compiler import CompileOptions, compile_graph

    with pytest.raises(ValueError, match="8-bit KV cache is calibrated by running the float model: pass a runtime"):
        compile_graph(None, tmp_path / "artifact", CompileOptions(kv_cache_bit_width=8), {})
    assert not (tmp_path / "artifact").exists()


def test_the_compiler_never_imports_onnxruntime():
    """The compiler runs graphs only through a runner the caller passes down (a runtime backend)."""
    compiler = RUNTIME.parent / "compiler"
    assert [str(p.relative_to(compiler)) for p in sorted(compiler.rglob("*.py"))
            if re.search(r"^\s*(import onnxruntime|from onnxruntime)", p.read_text(), re.M)] == []


def test_only_the_backend_touches_onnxruntime_or_allocates_buffers():
    """Static: outside runtime/backends/, no runtime module imports onnxruntime, and the KV managers and
    pipelines make no KV buffers with np.zeros / np.empty of their own (host arrays of results are theirs)."""
    offenders = []
    for path in sorted(RUNTIME.rglob("*.py")):
        if "backends" in path.parts:
            continue
        text = path.read_text()
        if re.search(r"^\s*(import onnxruntime|from onnxruntime)", text, re.M) or "OrtValue" in text:
            offenders.append(f"{path.relative_to(RUNTIME)}: onnxruntime")
        if path.parent.name == "kv_cache" or path.name in ("decoder.py", "bert.py"):
            for line in text.splitlines():
                if re.search(r"np\.(zeros|empty)\(\(.*(n_kv_heads|head_dim|page_size)", line):
                    offenders.append(f"{path.relative_to(RUNTIME)}: {line.strip()}")
    assert offenders == []


def test_devices_parse_and_bad_ones_fail_before_anything_is_compiled():
    from ember.runtime.session import parse_device

    assert parse_device("cpu") == Device("cpu", 0) and parse_device("cuda:3") == Device("cuda", 3)
    assert parse_device("cuda") == Device("cuda", 0)
    for bad in ("gpu", "cuda:x", "cuda:-1", ""):
        with pytest.raises(ValueError, match="is not cpu, cuda or cuda:N"):
            parse_device(bad)
        with pytest.raises(ValueError, match="is not cpu, cuda or cuda:N"):
            PipelineConfig(device=bad)


class HostAsCudaBackend(OrtCpuBackend):
    """The CPU backend declared for the cuda device kind: checks which device index a pipeline's session hands a
    backend of that kind (its graphs still run on the host)."""

    name = "host-as-cuda"
    device_kind = "cuda"
    indices: list[int] = []

    def load(self, artifact, rank=0):
        HostAsCudaBackend.indices.append(self.device_index)
        return super().load(artifact, rank)


def test_a_registry_loads_with_its_backends_table_on_the_configured_device(tmp_path):
    """``PipelineRegistry(backends=...)`` is the table its sessions use; the session runs on ``PipelineConfig.device``
    (else device 0 of the artifact's kind) and hands the backend that device's index."""
    from ember.runtime.pipelines import BUILTIN_ARCHITECTURES, PipelineRegistry
    from ember.runtime.pipelines.registry import load_compiled_artifact

    make_model("llama-gqa-llama3", tmp_path / "model")
    config = PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path / "cache", max_batch_size=1)
    resolved = PIPELINE_REGISTRY.resolve(config)
    expected = PIPELINE_REGISTRY.build_pipeline(resolved).generate_tokens([[1, 5, 9, 7]])[0]
    artifact = update_manifest(resolved.artifact.path, {"runtime": {**resolved.manifest["runtime"],
                                                                    "backend": "host-as-cuda", "device_kind": "cuda"}})
    registry = PipelineRegistry(BUILTIN_ARCHITECTURES, artifacts=load_compiled_artifact,
                                backends={**BACKENDS, HostAsCudaBackend.name: HostAsCudaBackend})
    HostAsCudaBackend.indices.clear()
    for device, index in ((None, 0), ("cuda:2", 2)):
        _, pipeline = registry.retrieve(PipelineConfig(model_path=artifact.path, max_batch_size=1, device=device))
        assert pipeline.pipeline_model.session.devices == [Device("cuda", index)]
        assert pipeline.generate_tokens([[1, 5, 9, 7]])[0] == expected
    assert HostAsCudaBackend.indices == [0, 2]
    with pytest.raises(ValueError, match="was compiled for cuda devices; this session has cpu:0"):
        registry.retrieve(PipelineConfig(model_path=artifact.path, max_batch_size=1, device="cpu"))


def test_a_view_binds_the_same_bytes_with_another_shape():
    """A paged pool ``[pages * page_size, kv, hd]`` bound page-major ``[pages, page_size, kv, hd]`` (the layout
    onnxruntime's contrib PagedAttention reads): no copy, and a shape of another size is refused."""
    backend = OrtCpuBackend()
    buffer = backend.allocate((6, 2, 3), np.float32)
    backend.to_host(buffer)[:] = np.arange(36, dtype=np.float32).reshape(6, 2, 3)
    view = backend.view(buffer, shape=(3, 2, 2, 3))
    assert view.shape() == [3, 2, 2, 3]
    assert np.array_equal(view.numpy()[1, 0], backend.to_host(buffer)[2])  # page 1, offset 0 = row 2
    backend.to_host(buffer)[5, 1, 2] = -1.0
    assert view.numpy()[2, 1, 1, 2] == -1.0  # the same memory
    with pytest.raises(ValueError, match=r"cannot be bound as \(3, 2, 2, 2\): the sizes differ"):
        backend.view(buffer, shape=(3, 2, 2, 2))


def test_paged_bindings_page_major_are_views_of_the_pool():
    from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy
    from ember.runtime.kv_cache.paged import PagedKVCacheManager

    params = KVCacheParams(dtype="float32", n_kv_heads=2, head_dim=3, num_layers=2,
                           cache_strategy=KVCacheStrategy.PAGED, page_size=4)
    manager = PagedKVCacheManager(params, num_pages=5, page_size=4, max_seq_len=16, backend=OrtCpuBackend())
    assert manager.bindings()[0][0].shape() == [20, 2, 3]
    key, value = manager.bindings(page_major=True)[1]
    assert key.shape() == value.shape() == [5, 4, 2, 3]
    manager.keys[1][9] = 7.0  # row 9 = page 2, offset 1
    assert (key.numpy()[2, 1] == 7.0).all()
    assert manager.bindings(page_major=True) is manager.bindings(page_major=True)  # made once


class FixedShapesBackend(OrtCpuBackend):
    """The CPU backend whose loaded models report fixed shape limits, as a TensorRT engine's optimization profile
    does (TensorRT cannot run here): the decoder must size its KV cache and batches to them."""

    name = "fixed-shapes"
    limits: dict[str, int] = {}

    def load(self, artifact, rank=0):
        model = super().load(artifact, rank)
        limits = dict(FixedShapesBackend.limits)
        model.__class__ = type("FixedShapesModel", (type(model),), {"shape_limits": property(lambda _: limits)})
        return model


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_the_decoder_follows_a_loaded_models_fixed_shapes(tmp_path, strategy):
    from ember.runtime.pipelines import BUILTIN_ARCHITECTURES, PipelineRegistry
    from ember.runtime.pipelines.registry import load_compiled_artifact

    make_model("llama-gqa-llama3", tmp_path / "model")
    config = PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path / "cache", max_batch_size=1,
                            kv_cache_strategy=strategy)
    resolved = PIPELINE_REGISTRY.resolve(config)
    expected = PIPELINE_REGISTRY.build_pipeline(resolved).generate_tokens([[1, 5, 9, 7]])[0]
    artifact = update_manifest(resolved.artifact.path, {"runtime": {**resolved.manifest["runtime"],
                                                                    "backend": FixedShapesBackend.name}})
    registry = PipelineRegistry(BUILTIN_ARCHITECTURES, artifacts=load_compiled_artifact,
                                backends={**BACKENDS, FixedShapesBackend.name: FixedShapesBackend})
    page_size = resolved.manifest["kv_params"]["page_size"]
    FixedShapesBackend.limits = ({"batch": 2, "sequence": 48, "max_length": 48} if strategy == "continuous" else
                                 {"batch": 2, "sequence": 48, "pages": 3, "pool_rows": 7 * page_size})
    _, pipeline = registry.retrieve(PipelineConfig(model_path=artifact.path))
    model = pipeline.pipeline_model
    assert model.kv.max_batch_size == 2  # the engine's batch, not the default 8 / 32
    if strategy == "continuous":
        assert model.max_seq_len == 48 and model.kv_manager.keys[0].shape[2] == 48
    else:
        assert model.max_seq_len == 3 * page_size and model.kv_manager.pool.num_pages == 7
    tokens = pipeline.generate_tokens([[1, 5, 9, 7]])[0]
    assert len(tokens) == model.max_seq_len - 4 and tokens == expected[:len(tokens)]  # stops at the engine's length
    with pytest.raises(ValueError, match="max_batch_size 4 is more than the 2 rows the engine"):
        registry.retrieve(PipelineConfig(model_path=artifact.path, max_batch_size=4))
    wrong_length = {"continuous": r"exactly 48 tokens in its continuous KV cache; pass --max-length 48 or none",
                    "paged": rf"max_length 100 is more than the {3 * page_size} tokens the engine"}[strategy]
    with pytest.raises(ValueError, match=wrong_length):
        registry.retrieve(PipelineConfig(model_path=artifact.path, max_length=100))
