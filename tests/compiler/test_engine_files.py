"""TensorRT engines per device kind in an artifact: file names, the manifest's ``engines`` table, selection (never a
stale engine), recording (replacing the stale one), verification, optimization profiles, and the device and
TensorRT probes.

The logic tests run here, without a GPU, on real artifacts (``write_artifact``) with device descriptions written
out by hand (the H100 and A100 below are what the driver reports for those GPUs). The engine bytes they record are
arbitrary bytes standing for a plan's file: what is tested is files, hashes, names and keys, never an engine, and
nothing here loads them as one. The one test that builds a real engine skips, saying why, without TensorRT and a
GPU.
"""
from __future__ import annotations

import ctypes
import json
import logging
from pathlib import Path

import pytest

from ember.compiler.artifact import (MANIFEST, Artifact, ArtifactError, read_manifest, sealed, update_manifest,
                                     verify_artifact, write_artifact)
from ember.compiler.cuda_device import CudaUnavailable, DeviceDescription, current_device, probe_cuda_device
from ember.compiler.engine_files import (engine_file_name, engine_key_material, find_engine, profile_covers,
                                         record_engine, select_engine)
from ember.compiler.hashing import sha256_file
from ember.compiler.tensorrt_engine import TensorRTUnavailable, optimization_profile, tensorrt_version

H100 = DeviceDescription("NVIDIA H100 80GB HBM3", 9, 0, 85_029_158_912, index=0)
A100 = DeviceDescription("NVIDIA A100-SXM4-40GB", 8, 0, 42_505_273_344, index=1)
L4 = DeviceDescription("NVIDIA L4", 8, 9, 23_580_639_232, index=2)
TRT_A, TRT_B = "10.16.1.11", "10.13.0.35"
PROFILE = {"input_ids": ((1, 1), (4, 1), (4, 64))}

GiB = 1 << 30


def populate(tmp: Path) -> dict:
    (tmp / "rank0").mkdir()
    (tmp / "rank0" / "model.onnx").write_bytes(b"the graph the engines are built from")
    (tmp / "config.json").write_text("{}")
    return {"architecture": "LlamaForCausalLM", "runtime": {"backend": "tensorrt", "device_kind": "cuda"},
            "ranks": [{"rank": 0, "device": "cuda", "model": "rank0/model.onnx"}]}


@pytest.fixture
def artifact(tmp_path) -> Artifact:
    return write_artifact(tmp_path / "artifact", populate)


def plan_bytes(tag: str) -> bytes:
    """Arbitrary bytes standing for a plan's file (never built, never loaded as an engine)."""
    return f"stands for an engine: {tag}".encode() * 100


def reseal(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(sealed(manifest)))


def test_device_kinds_and_engine_file_names():
    assert H100.kind_key == "nvidia-h100-80gb-hbm3-sm90"
    assert A100.kind_key == "nvidia-a100-sxm4-40gb-sm80"
    assert engine_file_name(H100, TRT_A) == "engines/nvidia-h100-80gb-hbm3-sm90-trt10.16.1.11.plan"
    # the kind is what the device is, not where it sits on this host
    assert engine_file_name(DeviceDescription(H100.name, 9, 0, H100.total_memory, index=5), TRT_A) == \
        engine_file_name(H100, TRT_A)
    assert engine_file_name(H100, TRT_A) != engine_file_name(H100, TRT_B) != engine_file_name(A100, TRT_B)
    assert H100.to_json() == {"kind": "nvidia-h100-80gb-hbm3-sm90", "name": "NVIDIA H100 80GB HBM3", "sm_major": 9,
                              "sm_minor": 0, "total_memory": 85_029_158_912}
    with pytest.raises(ValueError, match="not a TensorRT version"):
        engine_file_name(H100, "..")


def test_two_device_kinds_in_one_artifact_each_selected_only_for_its_own(artifact):
    record_engine(artifact.path, H100, TRT_A, plan_bytes("h100"), PROFILE)
    record_engine(artifact.path, A100, TRT_A, plan_bytes("a100"), PROFILE)
    verified = verify_artifact(artifact.path)
    assert sorted(p.name for p in (artifact.path / "engines").iterdir()) == [
        "nvidia-a100-sxm4-40gb-sm80-trt10.16.1.11.plan", "nvidia-h100-80gb-hbm3-sm90-trt10.16.1.11.plan"]
    assert set(verified.manifest["engines"]) == {engine_file_name(H100, TRT_A), engine_file_name(A100, TRT_A)}
    assert select_engine(verified, H100, TRT_A).read_bytes() == plan_bytes("h100")
    assert select_engine(verified, A100, TRT_A).read_bytes() == plan_bytes("a100")
    assert find_engine(verified, L4, TRT_A).reason.endswith("has no engine for nvidia-l4-sm89 with TensorRT "
                                                            "10.16.1.11")
    entry = verified.manifest["engines"][engine_file_name(H100, TRT_A)]
    assert entry["device"] == H100.to_json() and entry["tensorrt_version"] == TRT_A
    assert entry["model"] == "rank0/model.onnx"
    assert entry["model_sha256"] == sha256_file(artifact.path / "rank0" / "model.onnx")
    assert entry["profile"] == {"input_ids": {"min": [1, 1], "opt": [4, 1], "max": [4, 64]}}


def test_an_engine_of_another_tensorrt_version_is_stale_and_replaced(artifact, caplog):
    record_engine(artifact.path, H100, TRT_A, plan_bytes("h100 on A"), PROFILE)
    old = artifact.path / engine_file_name(H100, TRT_A)
    with caplog.at_level(logging.INFO, logger="ember.compiler.engine_files"):
        assert select_engine(verify_artifact(artifact.path), H100, TRT_B) is None
    assert "built with another TensorRT than 10.13.0.35" in caplog.text and "stale, not loaded" in caplog.text
    assert old.exists()  # selection never deletes: it only refuses

    record_engine(artifact.path, H100, TRT_B, plan_bytes("h100 on B"), PROFILE)
    verified = verify_artifact(artifact.path)
    assert not old.exists() and list(verified.manifest["engines"]) == [engine_file_name(H100, TRT_B)]
    assert select_engine(verified, H100, TRT_B).read_bytes() == plan_bytes("h100 on B")
    assert select_engine(verified, H100, TRT_A) is None


def test_an_engine_built_from_another_model_is_stale(artifact, caplog):
    record_engine(artifact.path, H100, TRT_A, plan_bytes("h100"), PROFILE)
    # The rank model changes and the manifest verifies it (a compile in place that kept engines/): the engine file
    # itself is intact and verifies, but it was built from other bytes.
    model = artifact.path / "rank0" / "model.onnx"
    model.write_bytes(b"another graph")
    manifest = read_manifest(artifact.path)
    manifest["files"]["rank0/model.onnx"] = {"size": model.stat().st_size, "sha256": sha256_file(model)}
    reseal(artifact.path, manifest)
    changed = verify_artifact(artifact.path)
    with caplog.at_level(logging.INFO, logger="ember.compiler.engine_files"):
        assert select_engine(changed, H100, TRT_A) is None
    assert "was built from another rank0/model.onnx" in caplog.text

    # Recording any engine removes those built from the old model: no one can load them any more.
    record_engine(artifact.path, A100, TRT_A, plan_bytes("a100"), PROFILE)
    after = verify_artifact(artifact.path)
    assert list(after.manifest["engines"]) == [engine_file_name(A100, TRT_A)]
    assert not (artifact.path / engine_file_name(H100, TRT_A)).exists()


def test_recording_the_same_kind_and_version_again_replaces_the_file(artifact):
    record_engine(artifact.path, H100, TRT_A, plan_bytes("first"), PROFILE)
    wider = {"input_ids": ((1, 1), (8, 1), (8, 128))}
    record_engine(artifact.path, H100, TRT_A, plan_bytes("second, wider"), wider)
    verified = verify_artifact(artifact.path)
    assert list(verified.manifest["engines"]) == [engine_file_name(H100, TRT_A)]
    assert select_engine(verified, H100, TRT_A, profile=wider).read_bytes() == plan_bytes("second, wider")


def test_verify_artifact_checks_engine_files(artifact):
    record_engine(artifact.path, H100, TRT_A, plan_bytes("h100"), PROFILE)
    engine = artifact.path / engine_file_name(H100, TRT_A)
    data = bytearray(engine.read_bytes())
    data[100] ^= 1
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"file {engine_file_name(H100, TRT_A)} does not match its sha256"):
        verify_artifact(artifact.path)
    # and selection refuses it too, naming it, rather than handing TensorRT a damaged plan
    choice = find_engine(Artifact(artifact.path, read_manifest(artifact.path)), H100, TRT_A)
    assert choice.path is None and "does not match its sha256" in choice.reason

    engine.write_bytes(b"short")
    with pytest.raises(ArtifactError, match="has 5 bytes"):
        verify_artifact(artifact.path)

    # The next engine recorded drops the damaged one (its file and its entry), so the artifact verifies again.
    record_engine(artifact.path, A100, TRT_A, plan_bytes("a100"), PROFILE)
    assert list(verify_artifact(artifact.path).manifest["engines"]) == [engine_file_name(A100, TRT_A)]
    assert not engine.exists()


def test_an_engine_file_the_manifest_does_not_list_is_refused(artifact):
    (artifact.path / "engines").mkdir()
    (artifact.path / "engines" / "x.plan").write_bytes(plan_bytes("unlisted"))
    with pytest.raises(ArtifactError, match="file engines/x.plan is not in the manifest"):
        verify_artifact(artifact.path)


def test_the_engines_table_is_checked_and_changed_only_through_record_engine(artifact):
    with pytest.raises(ArtifactError, match="may not change engines"):
        update_manifest(artifact.path, {"engines": {}})
    manifest = read_manifest(artifact.path)
    for rel in ("engines/../config.json", "config.json", "engines/a/b.plan", "/etc/passwd"):
        reseal(artifact.path, {**manifest, "engines": {rel: {"size": 2, "sha256": sha256_file(
            artifact.path / "config.json")}}})
        with pytest.raises(ArtifactError, match="engine"):
            verify_artifact(artifact.path)
    reseal(artifact.path, {**manifest, "files": {**manifest["files"], "engines/x.plan": {"size": 1, "sha256": "0"}}})
    with pytest.raises(ArtifactError, match="belong in the manifest's engines table"):
        verify_artifact(artifact.path)


def test_an_engine_whose_profile_does_not_cover_the_limits_is_not_selected(artifact):
    record_engine(artifact.path, H100, TRT_A, plan_bytes("h100"), PROFILE, fp16=True)
    verified = verify_artifact(artifact.path)
    narrower = {"input_ids": ((1, 1), (2, 1), (2, 32))}
    wider = {"input_ids": ((1, 1), (8, 1), (8, 64))}
    assert select_engine(verified, H100, TRT_A, profile=narrower, fp16=True) is not None
    assert "do not cover" in find_engine(verified, H100, TRT_A, profile=wider).reason
    assert "fp16=False is asked" in find_engine(verified, H100, TRT_A, fp16=False).reason
    assert profile_covers(PROFILE, narrower) and not profile_covers(PROFILE, wider)
    assert not profile_covers(PROFILE, {**narrower, "other": ((1,), (1,), (1,))})
    assert not profile_covers(PROFILE, {"input_ids": ((1, 1), (2, 1), (2, 32, 1))})  # a max shape of another rank


def test_record_engine_leaves_no_temporary_folder_beside_the_artifact(artifact):
    before = sorted(p.name for p in artifact.path.parent.iterdir())
    record_engine(artifact.path, H100, TRT_A, plan_bytes("h100"), PROFILE)
    assert sorted(p.name for p in artifact.path.parent.iterdir()) == before


def test_the_cache_key_material_names_the_tensorrt_version():
    assert engine_key_material(TRT_A) == {"tensorrt": TRT_A}
    assert engine_key_material(None) == {"tensorrt": "not installed"}
    assert engine_key_material(TRT_A) != engine_key_material(TRT_B)


# -- optimization profiles of real compiled artifacts ------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A tiny decoder compiled with each KV cache strategy: their manifests describe the graph inputs."""
    from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

    from ..reference.tiny_models import make_model

    root = tmp_path_factory.mktemp("engine-profiles")
    make_model("llama-gqa-llama3", root / "model")
    return {strategy: PIPELINE_REGISTRY.resolve(PipelineConfig(model_path=root / "model", cache_dir=root,
                                                                kv_cache_strategy=strategy)).artifact
            for strategy in ("continuous", "paged")}


def test_the_profile_of_a_continuous_cache_artifact(compiled):
    manifest = compiled["continuous"].manifest
    profile = optimization_profile(manifest["graph"]["inputs"], 4, 64, manifest["kv_cache_strategy"])
    assert set(profile) == {value["name"] for value in manifest["graph"]["inputs"]}
    assert profile["input_ids"] == ((1, 1), (4, 1), (4, 64))
    assert profile["input_lengths"] == profile["cache_lengths"] == ((1,), (4,), (4,))
    heads, head_dim = manifest["kv_params"]["n_kv_heads"], manifest["kv_params"]["head_dim"]
    for layer in range(manifest["kv_params"]["num_layers"]):
        for kv in ("key", "value"):
            assert profile[f"past_key_values.{layer}.{kv}"] == ((1, heads, 64, head_dim), (4, heads, 64, head_dim),
                                                                (4, heads, 64, head_dim))


def test_the_profile_of_a_paged_cache_artifact(compiled):
    manifest = compiled["paged"].manifest
    page_size = manifest["kv_params"]["page_size"]
    assert page_size == 16
    profile = optimization_profile(manifest["graph"]["inputs"], 4, 64, manifest["kv_cache_strategy"], pages=10,
                                   page_size=page_size)
    assert set(profile) == {value["name"] for value in manifest["graph"]["inputs"]}
    assert profile["input_ids"] == profile["slot_mapping"] == ((1, 1), (4, 1), (4, 64))
    assert profile["page_table"] == ((1, 1), (4, 4), (4, 4))  # 64 tokens in pages of 16
    heads, head_dim = manifest["kv_params"]["n_kv_heads"], manifest["kv_params"]["head_dim"]
    assert profile["key_cache.0"] == profile["value_cache.2"] == ((160, heads, head_dim),) * 3  # 10 pages of 16


def test_a_dimension_without_a_rule_is_an_error_naming_it(compiled):
    inputs = compiled["paged"].manifest["graph"]["inputs"]
    with pytest.raises(ValueError, match="input page_table has the dimension 'pages', which has no optimization "
                                         "profile range for the continuous KV cache"):
        optimization_profile(inputs, 4, 64, "continuous")
    with pytest.raises(ValueError, match="needs the pool's pages and page_size"):
        optimization_profile(inputs, 4, 64, "paged")
    with pytest.raises(ValueError, match="'frames'"):
        optimization_profile([{"name": "audio", "dtype": "FLOAT", "shape": ["batch", "frames"]}], 4, 64, None)


# -- the device and TensorRT, where they are not ----------------------------------------------------------------

def _driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_probing_without_a_driver_says_so_in_one_line():
    with pytest.raises(CudaUnavailable, match=r"^no CUDA driver: libcuda-absent\.so\.1 cannot be loaded \(") as error:
        probe_cuda_device(0, driver="libcuda-absent.so.1")
    assert "\n" not in str(error.value)
    with pytest.raises(CudaUnavailable, match="no CUDA driver"), current_device(0, driver="libcuda-absent.so.1"):
        pass


def test_probing_the_real_driver():
    if not _driver_loads():
        with pytest.raises(CudaUnavailable, match=r"^no CUDA driver: libcuda\.so\.1 cannot be loaded"):
            probe_cuda_device(0)
        return
    try:
        device = probe_cuda_device(0)
    except CudaUnavailable as error:  # a driver without devices (a container without GPUs)
        pytest.skip(f"the CUDA driver loads but has no usable device: {error}")
    assert device.sm_major >= 3 and device.total_memory > GiB and device.kind_key.endswith(
        f"-sm{device.sm_major}{device.sm_minor}")
    with pytest.raises(CudaUnavailable, match="there is no device cuda:4096"):
        probe_cuda_device(4096)


def test_tensorrt_version_says_why_tensorrt_is_missing():
    try:
        version = tensorrt_version()
    except TensorRTUnavailable as error:
        assert "\n" not in str(error) and str(error).startswith(("TensorRT is not installed",
                                                                 "TensorRT cannot be loaded",
                                                                 "TensorRT cannot be imported"))
        return
    pytest.skip(f"TensorRT {version} loads here: its absence cannot be tested")


def test_building_and_recording_a_real_engine(tmp_path):
    """On a machine with TensorRT and a GPU: compile the tiny model for the tensorrt target, build its engine for
    cuda:0, record it, load the plan with TensorRT, and find it again without a rebuild."""
    try:
        version = tensorrt_version()
    except TensorRTUnavailable as error:
        pytest.skip(f"no TensorRT here: {error}")
    try:
        device = probe_cuda_device(0)
    except CudaUnavailable as error:
        pytest.skip(f"no GPU here: {error}")
    from ember.compiler.targets import TARGETS
    from ember.compiler.tensorrt_engine import ensure_engine
    from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

    from ..reference.tiny_models import make_model

    if "tensorrt" not in TARGETS:
        pytest.skip("the tensorrt target is not registered in this checkout")
    strategy = TARGETS["tensorrt"].kv_strategies[0]
    pages = 9 if strategy.value == "paged" else None
    make_model("llama-gqa-llama3", tmp_path / "model")
    artifact = PIPELINE_REGISTRY.resolve(PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path,
                                                        target="tensorrt", kv_cache_strategy=strategy)).artifact
    path = ensure_engine(artifact, device, max_batch_size=2, max_length=64, pages=pages)
    assert path.name == Path(engine_file_name(device, version)).name
    verified = verify_artifact(artifact.path)
    assert select_engine(verified, device, version) == path
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    assert engine is not None and engine.num_io_tensors > 0
    built = path.stat().st_mtime_ns
    assert ensure_engine(verified, device, max_batch_size=2, max_length=64, pages=pages) == path
    assert path.stat().st_mtime_ns == built  # found, not rebuilt


def test_set_engines_refuses_a_table_whose_files_do_not_verify(artifact):
    from ember.compiler.artifact import set_engines

    before = (artifact.path / MANIFEST).read_bytes()
    with pytest.raises(ArtifactError, match="file engines/x.plan listed in the manifest is missing"):
        set_engines(artifact.path, {"engines/x.plan": {"size": 3, "sha256": "0" * 64}})
    (artifact.path / "engines").mkdir()
    (artifact.path / "engines" / "x.plan").write_bytes(b"abc")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        set_engines(artifact.path, {"engines/x.plan": {"size": 3, "sha256": "0" * 64}})
    assert (artifact.path / MANIFEST).read_bytes() == before
