"""Collectives on device buffers (NCCL) for GPU tensor-parallel artifacts: what is checked without a GPU here (the
CUDA array interface a device view is lent to torch with, the host operands through the same helpers, the manifest a
GPU target writes, the refusal where torch has no CUDA device), and, on a host with two or more GPUs, the NCCL
collectives against their numpy references and a tiny Llama over two GPU ranks against one GPU (skipped here with
the reason printed)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="tensor parallelism runs over torch.distributed (the test extra)")

from ember.graphs.ir.custom.collectives import all_gather_reference, all_reduce_reference  # noqa: E402
from ember.runtime.backends.cuda_memory import DeviceUnavailable, DeviceView, host_dtype  # noqa: E402
from ember.runtime.distributed import RankGroup, TorchDistributedCommunicator  # noqa: E402
from ember.runtime.distributed.device_tensors import as_torch, cuda_array_interface, from_torch  # noqa: E402
from ember.runtime.distributed.launcher import free_port  # noqa: E402


def _two_gpus_reason() -> str | None:
    """Why the NCCL runs cannot happen here (None: they can)."""
    if not torch.cuda.is_available():
        return f"this torch ({torch.__version__}) sees no CUDA device"
    if torch.cuda.device_count() < 2:
        return f"NCCL ranks need two GPUs; this host has {torch.cuda.device_count()}"
    if not torch.distributed.is_nccl_available():
        return "this torch has no NCCL"
    try:
        from ember.runtime.backends import OrtCudaBackend

        OrtCudaBackend()
    except DeviceUnavailable as error:
        return str(error)
    return None


TWO_GPUS_REASON = _two_gpus_reason()
needs_two_gpus = pytest.mark.skipif(TWO_GPUS_REASON is not None, reason=f"needs 2 NVIDIA GPUs: {TWO_GPUS_REASON}")


@pytest.mark.parametrize("dtype,typestr", [("float32", "<f4"), ("float16", "<f2"), ("int64", "<i8"),
                                           ("bfloat16", "<i2")])
def test_a_device_view_is_lent_to_torch_by_address_shape_and_type(dtype, typestr):
    view = DeviceView(0x7F0000001000, (3, 5), host_dtype(dtype), 1)
    assert cuda_array_interface(view) == {"shape": (3, 5), "typestr": typestr, "data": (0x7F0000001000, False),
                                          "strides": None, "version": 3}


def test_a_view_of_a_type_no_collective_sums_is_refused():
    with pytest.raises(TypeError, match="numeric"):
        cuda_array_interface(DeviceView(0x1000, (2,), np.dtype("U4"), 0))


def test_host_operands_share_memory_with_torch_both_ways():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = as_torch(torch, array)
    tensor += 1  # the sum of a collective lands in the array itself
    assert array[1, 2] == 6.0
    back = from_torch(torch.cat([tensor, tensor], dim=1), array)
    assert isinstance(back, np.ndarray) and back.shape == (2, 6)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.runtime.distributed.tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), num_key_value_heads=2, tie_word_embeddings=False)


@pytest.mark.parametrize("target,encoding,backend,operands", [("ort-cuda", "float16", "nccl", "device"),
                                                              ("ort-cpu", "float32", "gloo", "host")])
def test_a_gpu_artifact_asks_for_nccl_on_device_buffers_and_a_cpu_one_for_gloo_on_the_host(
        tiny_llama, tmp_path, target, encoding, backend, operands):
    from ember.compiler.artifact import verify_artifact
    from ember.tools.compile_model import compile_model

    result = compile_model(tiny_llama, tmp_path / "artifact", target=target, encoding=encoding, tensor_parallel=2)
    manifest = verify_artifact(result.path).manifest
    assert manifest["tensor_parallel"] == {"world_size": 2, "communicator": "torch.distributed", "backend": backend,
                                           "collectives_on": operands}
    assert [len(rank["stages"]) for rank in manifest["ranks"]] == [2 * 2 + 3] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the refusal cannot be seen")
def test_without_cuda_a_rank_refuses_the_nccl_group_naming_what_is_missing():
    communicator = TorchDistributedCommunicator(0, 1, f"tcp://127.0.0.1:{free_port()}", timeout_s=10)
    try:
        with pytest.raises(RuntimeError, match="NCCL on CUDA devices; this torch .* has no CUDA device"):
            communicator.open_device_group("nccl", 0)
        with pytest.raises(ValueError, match="over NCCL"):
            communicator.open_device_group("gloo", 0)
        with pytest.raises(RuntimeError, match="open_device_group"):
            communicator.all_reduce(DeviceView(0x1000, (2,), np.dtype("float32"), 0))
    finally:
        communicator.close()


# On two GPUs ------------------------------------------------------------------------------------------------------
SHAPE = (3, 5, 7)


def _device_collectives(rank: int, world: int, init_method: str) -> list[np.ndarray]:
    """Every rank: its inputs in device memory (the backend's allocator), summed and gathered over NCCL in place."""
    from ember.runtime.backends.cuda_memory import CudaDevice

    communicator = TorchDistributedCommunicator(rank, world, init_method, timeout_s=30)
    device = CudaDevice(rank, "the NCCL test")
    try:
        communicator.open_device_group("nccl", rank)
        results = []
        for round_, axis in enumerate((0, 1, -1)):
            for dtype in (np.float32, np.float16):
                mine = np.random.default_rng(100 * round_ + rank).standard_normal(SHAPE).astype(dtype)
                memory = device.allocate(mine.nbytes)
                device.from_host(memory.ptr, mine)
                view = DeviceView(memory.ptr, SHAPE, mine.dtype, rank, memory)
                communicator.all_reduce(view)
                results.append(device.to_host(memory.ptr, np.empty(SHAPE, dtype)))
                gathered = communicator.all_gather(DeviceView(memory.ptr, SHAPE, mine.dtype, rank, memory), axis)
                assert isinstance(gathered, DeviceView) and gathered.device_index == rank
                results.append(as_torch(torch, gathered).cpu().numpy())
        return results
    finally:
        communicator.close()


def _expected(world: int) -> list[np.ndarray]:
    out = []
    for round_, axis in enumerate((0, 1, -1)):
        for dtype in (np.float32, np.float16):
            shards = [np.random.default_rng(100 * round_ + r).standard_normal(SHAPE).astype(dtype)
                      for r in range(world)]
            summed = all_reduce_reference(shards)
            # the reduced buffer was all-gathered after the sum, so every rank gathers the same sums
            out += [summed, all_gather_reference([summed] * world, axis)]
    return out


def _check_device_collectives(rank: int, world: int, init_method: str) -> None:
    for got, want in zip(_device_collectives(rank, world, init_method), _expected(world)):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


@needs_two_gpus
def test_nccl_collectives_on_device_buffers_match_their_references():
    with RankGroup.start(2, _check_device_collectives) as children:
        for got, want in zip(_device_collectives(0, 2, children.init_method), _expected(2)):
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
        children.close()
        assert children.failed_ranks() == {}


@needs_two_gpus
def test_a_tiny_llama_over_two_gpu_ranks_gives_the_one_gpu_logits_and_tokens(tiny_llama, tmp_path):
    from ember.graphs.nn import KVCacheStrategy
    from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits
    from tests.reference.decode_loop import decode_steps

    def pipeline(tensor_parallel: int):
        return PIPELINE_REGISTRY.retrieve(PipelineConfig(
            model_path=tiny_llama, cache_dir=tmp_path / "cache", target="ort-cuda", encoding="float32",
            kv_cache_strategy=KVCacheStrategy.PAGED, max_batch_size=4, return_logits=ReturnLogits.ALL,
            tensor_parallel=tensor_parallel, kv_cache_bytes=64 << 20))[1]

    single, split = pipeline(1), pipeline(2)
    try:
        assert split.pipeline_model.artifact.manifest["tensor_parallel"]["collectives_on"] == "device"
        for prompt in ([5, 17, 33, 2, 90, 41, 7], [11, 12, 13, 99, 140, 3, 60, 61, 62, 8, 9]):
            tokens, steps, _ = decode_steps(split, prompt, 8)
            want_tokens, want_steps, _ = decode_steps(single, prompt, 8)
            assert tokens == want_tokens
            for got, want in zip(steps, want_steps):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # TF32 / summation order on the GPU
    finally:
        split.pipeline_model.model.group.close()
