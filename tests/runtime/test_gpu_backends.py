"""The GPU runtime backends (issue 12): ``onnxruntime-cuda`` and ``tensorrt`` import on a CPU-only install and are in
the backends table; without a GPU they fail in one line naming what is missing; a cuda session is accepted and a
cuda artifact fails clearly; the arithmetic they run on (row views, row copies as device copies, swaps through a
staging buffer, dtype mappings, output buffer sizing) is checked against numpy here. Runs on a GPU skip with the
reason printed where there is none."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from ember.runtime.backends import BACKENDS, OrtCudaBackend, TensorRTBackend
from ember.runtime.backends.cuda_memory import (
    DeviceUnavailable,
    copy_plan,
    row_range,
    row_regions,
)
from ember.runtime.backends.ort_cuda import numpy_dtype_of as ort_numpy_dtype
from ember.runtime.backends.ort_cuda import ort_element_type
from ember.runtime.backends.tensorrt import (
    engine_limits,
    max_output_shape,
    symbolic_maxima,
    trt_dtype_name,
)
from ember.runtime.backends.tensorrt import numpy_dtype_of as trt_numpy_dtype
from ember.runtime.session import Device, InferenceSession


def _gpu_reason() -> str | None:
    """Why the GPU runs cannot happen here (None: they can)."""
    try:
        OrtCudaBackend()
    except DeviceUnavailable as error:
        return str(error)
    return None


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"needs an NVIDIA GPU: {GPU_REASON}")


def test_the_gpu_backends_are_in_the_table_and_import_without_cuda_packages():
    assert BACKENDS["onnxruntime-cuda"] is OrtCudaBackend and BACKENDS["tensorrt"] is TensorRTBackend
    assert OrtCudaBackend.device_kind == TensorRTBackend.device_kind == "cuda"
    # A fresh interpreter: importing ember.runtime loads none of onnxruntime-gpu's CUDA, cuda-python, TensorRT, or
    # the compiler.
    code = ("import sys, ember.runtime.backends; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cuda', 'tensorrt') "
            "or m.startswith('ember.compiler')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is here: the no-GPU errors cannot be seen")
@pytest.mark.parametrize("backend", [OrtCudaBackend, TensorRTBackend])
def test_without_a_gpu_a_backend_fails_in_one_line_naming_what_is_missing(backend):
    with pytest.raises(DeviceUnavailable) as caught:
        backend({}, 1, 0)
    message = str(caught.value)
    assert "\n" not in message and f"the {backend.name} backend" in message
    assert any(what in message for what in ("onnxruntime-gpu", "cuda-python", "NVIDIA GPU", "TensorRT")), message


def test_a_cuda_session_is_accepted_and_a_cuda_artifact_fails_clearly_without_a_gpu(tmp_path):
    from ember.compiler.artifact import update_manifest
    from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

    from ..reference.tiny_models import make_model

    session = InferenceSession([Device("cuda", 0)], num_threads=1)
    assert session.devices == [Device("cuda", 0)]
    if GPU_REASON is None:
        pytest.skip("a GPU is here: loading would not fail")
    make_model("llama-gqa-llama3", tmp_path / "model")
    artifact = PIPELINE_REGISTRY.resolve(PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path / "cache",
                                                        max_batch_size=1)).artifact
    for name in ("onnxruntime-cuda", "tensorrt"):
        update_manifest(artifact.path, {"runtime": {"backend": name, "device_kind": "cuda", "settings": {}}})
        with pytest.raises(DeviceUnavailable, match=f"the {name} backend"):
            session.load(artifact.path)


# row arithmetic ------------------------------------------------------------------------------------------------------
def test_row_ranges_follow_python_slices():
    assert row_range(8, None, None) == (0, 8)
    assert row_range(8, 2, 5) == (2, 3)
    assert row_range(8, -3, None) == (5, 3)
    assert row_range(8, 6, 20) == (6, 2)
    assert row_range(8, 5, 2) == (5, 0)


def test_row_regions_of_a_kv_slot_prefix():
    # [slots, heads=3, max_len=10, head_dim=4] float16; positions 0:6 of every head: one 2-D copy per row
    regions = row_regions((5, 3, 10, 4), 2, (slice(None), slice(0, 6)))
    assert [(r.offset, r.width, r.height, r.pitch) for r in regions] == [(0, 6 * 4 * 2, 3, 10 * 4 * 2)]
    assert [(r.offset, r.width) for r in row_regions((5, 3, 10, 4), 2)] == [(0, 3 * 10 * 4 * 2)]
    assert [(r.offset, r.width, r.height) for r in row_regions((5, 3, 10, 4), 2, (1,))] == [(10 * 4 * 2, 80, 1)]
    assert row_regions((5, 3, 10, 4), 2, (slice(None), slice(0, 0))) == []
    with pytest.raises(ValueError, match="step 2"):
        row_regions((5, 3, 10, 4), 2, (slice(None, None, 2),))


def _simulate(plan, array: np.ndarray) -> np.ndarray:
    """Run a copy plan on the bytes of a host array, as the device would (in order; staging buffer apart)."""
    data = array.copy().reshape(-1).view(np.uint8)
    temp = np.zeros(plan.temp_bytes, np.uint8)
    for c in plan.copies:
        for h in range(c.height):
            src = (temp if c.src_temp else data)[c.src + h * c.src_pitch:][:c.width].copy()
            (temp if c.dst_temp else data)[c.dst + h * c.dst_pitch:][:c.width] = src
    return data.view(array.dtype).reshape(array.shape)


CASES = [
    ([0], [2], (slice(None), slice(0, 2))),  # a slot move, its first positions
    ([1, 3], [3, 1], ()),  # a swap of whole rows
    ([0, 1], [1, 0], (slice(None), slice(0, 7))),  # a swap of slot prefixes
    ([0, 1, 2], [3, 4, 5], ()),  # consecutive whole rows: one copy
    ([4, 0], [1, 4], (1, slice(2, 5))),  # a chain through row 4, one head's positions
    ([2, 2], [0, 1], ()),  # a repeated destination: the last wins
    ([3], [3], ()),  # onto itself
    ([0, 5], [5, 0], (slice(1, 3), slice(0, 9), slice(1, 3))),  # an inner partial axis: per-head regions
]


@pytest.mark.parametrize("dst,src,within", CASES)
def test_copy_plans_do_what_numpy_assignment_does(dst, src, within):
    array = np.arange(6 * 3 * 10 * 4, dtype=np.float16).reshape(6, 3, 10, 4)
    expected = array.copy()
    expected[(np.asarray(dst), *within)] = expected[(np.asarray(src), *within)]
    plan = copy_plan(array.shape, array.itemsize, dst, src, within)
    assert np.array_equal(_simulate(plan, array), expected)


def test_swaps_stage_and_disjoint_copies_do_not():
    shape = (6, 3, 10, 4)
    swap = copy_plan(shape, 2, [1, 3], [3, 1])
    assert swap.temp_bytes == 2 * 3 * 10 * 4 * 2
    assert [c.dst_temp for c in swap.copies] == [True, True, False, False]  # every read before any write
    rows = copy_plan(shape, 2, [0, 1, 2], [3, 4, 5])
    assert rows.temp_bytes == 0 and len(rows.copies) == 1 and rows.copies[0].width == 3 * 3 * 10 * 4 * 2
    assert copy_plan(shape, 2, [3], [3]).copies == ()
    with pytest.raises(IndexError, match="row 6 is out of range"):
        copy_plan(shape, 2, [6], [0])
    with pytest.raises(ValueError, match="2 destination rows for 1 source rows"):
        copy_plan(shape, 2, [0, 1], [2])


def test_random_row_copies_match_numpy():
    rng = np.random.default_rng(0)
    array = rng.standard_normal((7, 2, 5, 3)).astype(np.float32)
    for _ in range(200):
        n = int(rng.integers(1, 5))
        dst, src = rng.integers(0, 7, n).tolist(), rng.integers(0, 7, n).tolist()
        a, b = sorted(rng.integers(0, 6, 2).tolist())
        within = (slice(None), slice(a, b)) if rng.random() < 0.5 else ()
        expected = array.copy()
        expected[(np.asarray(dst), *within)] = expected[(np.asarray(src), *within)]
        assert np.array_equal(_simulate(copy_plan(array.shape, 4, dst, src, within), array), expected), (dst, src)


# dtypes and buffer sizing -----------------------------------------------------------------------------------------
def test_dtypes_map_to_onnxruntime_and_tensorrt():
    assert ort_element_type("float16") is np.float16 and ort_element_type(np.float32) is np.float32
    assert ort_element_type("int64") is np.int64 and ort_element_type("bfloat16") == 16  # TensorProto.BFLOAT16
    assert ort_numpy_dtype("tensor(float)") == np.float32 and ort_numpy_dtype("tensor(float16)") == np.float16
    assert ort_numpy_dtype("tensor(bfloat16)").name == "bfloat16"
    assert [trt_dtype_name(d) for d in ("float32", "float16", "bfloat16", "int8", "int32", "int64", "bool")] == \
        ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL"]
    assert trt_numpy_dtype("HALF") == np.float16 and trt_numpy_dtype("DataType.INT64") == np.int64
    assert trt_numpy_dtype("BF16").name == "bfloat16"
    with pytest.raises(TypeError, match="TensorRT has no tensor type for float64"):
        trt_dtype_name("float64")


def test_output_buffers_are_sized_from_the_profiles_maxima():
    inputs = [{"name": "input_ids", "shape": ["batch", "sequence"]},
              {"name": "page_table", "shape": ["batch", "pages"]},
              {"name": "key_cache.0", "shape": ["pool_rows", 3, 64]}]
    maxima = symbolic_maxima(inputs, {"input_ids": (8, 256), "page_table": (8, 16), "key_cache.0": (4112, 3, 64)})
    assert maxima == {"batch": 8, "sequence": 256, "pages": 16, "pool_rows": 4112}
    assert max_output_shape(["batch", "sequence", 49152], maxima) == (8, 256, 49152)  # all-position logits
    assert max_output_shape(["batch", 49152], maxima) == (8, 49152)
    assert max_output_shape(["batch", "total_sequence"], maxima) is None  # grown at run time instead


def test_engine_limits_default_and_from_settings():
    manifest = {"limits": {"max_position_embeddings": 2048}, "kv_cache_strategy": "paged",
                "kv_params": {"page_size": 16}}
    assert engine_limits(manifest, {}) == {"max_batch_size": 8, "max_length": 2048, "pages": 8 * 128 + 1}
    assert engine_limits(manifest, {"max_batch_size": 2, "max_length": 64, "pages": 20}) == \
        {"max_batch_size": 2, "max_length": 64, "pages": 20}
    assert engine_limits({"limits": {"max_position_embeddings": 512}}, {})["pages"] is None  # no KV cache


# on a GPU ------------------------------------------------------------------------------------------------------------
@needs_gpu
def test_device_buffers_views_copies_and_host_reads():
    backend = OrtCudaBackend()
    buffer = backend.allocate((4, 3, 5), np.float32)
    assert not backend.to_host(buffer).any() and buffer.host is None
    values = np.arange(60, dtype=np.float32).reshape(4, 3, 5)
    backend.cuda.from_host(buffer.handle.ptr, values)
    backend.copy_rows(buffer, [0], [2], (slice(None), slice(0, 2)))
    backend.copy_rows(buffer, [1, 3], [3, 1])
    expected = values.copy()
    expected[0, :, :2] = values[2, :, :2]
    expected[[1, 3]] = values[[3, 1]]
    assert np.array_equal(backend.to_host(buffer), expected)
    assert np.array_equal(backend.to_host(buffer, 1, 3), expected[1:3])
    view = backend.view(buffer, 1, 3)
    assert view.shape == (2, 3, 5) and view.ptr == buffer.handle.ptr + 60
    assert 0 < backend.available_memory()


@needs_gpu
def test_cuda_run_graph_updates_in_place(tmp_path):
    from .test_backends import _add_one_model

    backend = OrtCudaBackend()
    state = np.ones((2, 3), np.float32)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    backend.run_graph(_add_one_model(tmp_path / "m.onnx"), {"x": x}, {"state": ("state_out", state)})
    assert np.array_equal(state, 1 + x)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or GPU_REASON is not None,
                    reason=f"needs TensorRT and an NVIDIA GPU: {GPU_REASON or 'tensorrt is not installed'}")
def test_tensorrt_backend_starts_on_the_gpu():
    backend = TensorRTBackend()
    assert backend.available_memory() > 0
