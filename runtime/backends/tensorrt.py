"""``tensorrt``: a TensorRT engine per GPU model, the backend of target ``tensorrt`` (TensorRT 10 Python API).

Loading picks the artifact's engine for the device it runs on (``ember.compiler.engine_files``: one engine per
device kind and TensorRT version) and builds and records one first when there is none that is current
(``ember.compiler.tensorrt_engine.ensure_engine``: a compile step, so the compiler is imported inside
:meth:`TensorRTBackend.load` only). The engine is deserialized by ``trt.Runtime(logger).deserialize_cuda_engine``
on the device and run by one execution context:

* every I/O tensor has an address (``context.set_tensor_address``) and every input a shape
  (``context.set_input_shape``, within the engine's optimization profile 0) before
  ``context.execute_async_v3(stream)`` on the backend's stream;
* buffers (:mod:`.cuda_memory`) bind by address: a KV cache input and its output get the **same** address, so
  the engine's cache update writes in place (the tensorrt target's graph makes that update; the backend only
  binds);
* small per-step host inputs are copied into a device buffer per input, sized for the profile's maximum shape;
* outputs whose shape changes per call (:meth:`TensorRTModel.bind_output_to_host`: all-position logits) go to a
  device buffer sized for the largest shape the profile allows (:func:`max_output_shape`), and are copied to the
  host after the run; outputs nobody bound go to scratch device memory, discarded.

Engine limits: an engine is built for a maximum batch size and sequence length (and, for a PAGED cache, a pool of
a fixed number of pages). The runtime settings ``max_batch_size``, ``max_length`` and ``pages`` say what to build
for; without them the backend loads any current engine of this device, else builds for :func:`engine_limits`'
defaults. :attr:`TensorRTModel.profile` says what the loaded engine accepts.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from .base import LoadedModel
from .cuda_memory import (
    CudaBuffersBackend,
    DeviceMemory,
    DeviceUnavailable,
    DeviceView,
    host_dtype,
)

if TYPE_CHECKING:
    from ember.compiler.artifact import Artifact

logger = logging.getLogger(__name__)

TENSORRT_HINT = "pip install 'ember[tensorrt]'"
#: ``trt.DataType`` member names by numpy dtype name (TensorRT 10).
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8", "int32": "INT32",
              "int64": "INT64", "bool": "BOOL", "uint8": "UINT8"}
NUMPY_DTYPES = {trt_name: numpy_name for numpy_name, trt_name in TRT_DTYPES.items()}
#: The limits an engine is built for when the runtime settings name none.
DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_LENGTH = 8, 4096


def trt_dtype_name(dtype: Any) -> str:
    """The ``trt.DataType`` member of a numpy dtype (``float16`` -> ``HALF``); TypeError for one TensorRT lacks."""
    name = host_dtype(dtype).name
    if name not in TRT_DTYPES:
        raise TypeError(f"TensorRT has no tensor type for {name}")
    return TRT_DTYPES[name]


def numpy_dtype_of(trt_dtype: Any) -> np.dtype:
    """The numpy dtype of a ``trt.DataType`` (or its member name: ``HALF`` -> float16)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rpartition(".")[2])
    if name not in NUMPY_DTYPES:
        raise TypeError(f"no numpy dtype for TensorRT's {name}")
    return host_dtype(NUMPY_DTYPES[name])


class EngineLimits(TypedDict):
    """What an engine is built for (``ensure_engine``'s keywords)."""

    max_batch_size: int
    max_length: int
    pages: int | None


def engine_limits(manifest: Mapping[str, Any], settings: Mapping[str, Any]) -> EngineLimits:
    """The ``max_batch_size``, ``max_length`` and ``pages`` an engine is built for: the runtime settings', else
    8 sequences of up to 4096 tokens (capped to the model's positions), and for a PAGED cache the pool that holds
    them all plus the scratch page."""
    limits = manifest.get("limits", {})
    max_batch = int(settings.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE)
    max_length = int(settings.get("max_length") or min(DEFAULT_MAX_LENGTH,
                                                        limits.get("max_position_embeddings", DEFAULT_MAX_LENGTH)))
    pages = settings.get("pages")
    kv = manifest.get("kv_params")
    if pages is None and kv is not None and manifest.get("kv_cache_strategy") == "paged":
        pages = max_batch * math.ceil(max_length / int(kv["page_size"])) + 1
    return {"max_batch_size": max_batch, "max_length": max_length, "pages": None if pages is None else int(pages)}


def symbolic_maxima(graph_inputs: Sequence[Mapping[str, Any]],
                    input_max_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Each symbolic dimension of the graph's inputs (the manifest's ``graph.inputs``) and the largest value the
    engine's profile lets it take (``input_max_shapes``: input -> maximum shape)."""
    maxima: dict[str, int] = {}
    for value in graph_inputs:
        high = input_max_shapes.get(value["name"])
        if high is None:
            continue
        for dim, size in zip(value["shape"], high):
            if isinstance(dim, str):
                maxima[dim] = max(maxima.get(dim, 0), int(size))
    return maxima


def max_output_shape(shape: Sequence[int | str], maxima: Mapping[str, int]) -> tuple[int, ...] | None:
    """The largest shape of an output (the manifest's symbolic shape) under the profile's ``maxima``; None when a
    dimension is not an input's (then the buffer grows when a run needs more)."""
    if any(isinstance(d, str) and d not in maxima for d in shape):
        return None
    return tuple(maxima[d] if isinstance(d, str) else int(d) for d in shape)


def import_tensorrt(what: str) -> Any:
    """The ``tensorrt`` module; DeviceUnavailable (one line) when it is not installed or its library not loadable."""
    try:
        import tensorrt
    except ModuleNotFoundError as error:
        if error.name in ("tensorrt", "tensorrt_bindings"):
            raise DeviceUnavailable(f"{what} needs TensorRT, which is not installed ({TENSORRT_HINT})") from None
        raise DeviceUnavailable(f"{what}: TensorRT cannot be imported: {error}") from None
    except (ImportError, OSError) as error:  # the bindings are there, libnvinfer is not
        raise DeviceUnavailable(f"{what}: TensorRT cannot be loaded: {error}") from None
    return tensorrt


class TensorRTModel(LoadedModel):
    """One engine and its execution context, with addresses and shapes kept across calls (module docstring)."""

    backend: TensorRTBackend

    def __init__(self, backend: TensorRTBackend, engine: Any, graph: Mapping[str, Any], load_seconds: float,
                 engine_path: Path):
        trt = backend.trt
        self.backend = backend
        self.engine = engine
        self.engine_path = engine_path
        self.load_seconds = load_seconds
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {engine_path}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._dtypes = {n: numpy_dtype_of(engine.get_tensor_dtype(n)) for n in names}
        #: input -> (min, opt, max) shape of the engine's optimization profile 0
        self.profile = {n: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(n, 0))
                        for n in self.input_names}
        maxima = self._maxima = symbolic_maxima(graph.get("inputs", []), {n: s[2] for n, s in self.profile.items()})
        self._max_outputs = {v["name"]: max_output_shape(v["shape"], maxima) for v in graph.get("outputs", [])}
        self._staging: dict[str, DeviceMemory] = {}  # per-step inputs and host / scratch outputs
        self._addresses: dict[str, int] = {}
        self._bound_bytes: dict[str, int] = {}  # outputs bound to views: their room
        self._host_outputs: set[str] = set()
        self._results: dict[str, np.ndarray] = {}

    @property
    def shape_limits(self) -> dict[str, int]:
        return dict(self._maxima)

    def input_dtype(self, name: str) -> np.dtype:
        if name not in self.input_names:
            raise KeyError(f"the engine has no input {name!r}")
        return self._dtypes[name]

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            low, _, high = self.profile[name]
            raise ValueError(f"input {name} of shape {shape} is outside the engine's profile {low}..{high} "
                             f"({self.engine_path.name})")

    def _set_address(self, name: str, ptr: int) -> None:
        if self._addresses.get(name) != ptr:
            if not self.context.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the address of {name}")
            self._addresses[name] = ptr

    def _room(self, name: str, nbytes: int) -> DeviceMemory:
        """A device buffer of at least ``nbytes`` for ``name``'s staged input or output (kept, grown when short)."""
        memory = self._staging.get(name)
        if memory is None or memory.nbytes < nbytes:
            memory = self._staging[name] = self.backend.cuda.allocate(max(nbytes, 1))
        return memory

    def _max_bytes(self, name: str) -> int:
        high = self.profile[name][2] if name in self.profile else self._max_outputs.get(name)
        return 0 if high is None else math.prod(high) * self._dtypes[name].itemsize

    def bind_input(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self._dtypes[name])
        self._set_shape(name, array.shape)
        memory = self._room(name, max(array.nbytes, self._max_bytes(name)))
        self.backend.cuda.from_host(memory.ptr, array)
        self._set_address(name, memory.ptr)

    def bind_buffer(self, name: str, view: DeviceView, *, output: bool = False) -> None:
        if np.dtype(view.dtype) != self._dtypes[name]:
            raise TypeError(f"{name} is {self._dtypes[name]} in the engine; the buffer bound to it is {view.dtype}")
        if output:
            self._host_outputs.discard(name)
            self._bound_bytes[name] = view.nbytes
        else:
            self._set_shape(name, view.shape)
        self._set_address(name, view.ptr)

    def bind_output_to_host(self, name: str) -> None:
        self._host_outputs.add(name)
        self._bound_bytes.pop(name, None)

    def run(self) -> None:
        cuda = self.backend.cuda
        cuda.activate()
        shapes = {}
        for name in self.output_names:
            shape = shapes[name] = tuple(int(d) for d in self.context.get_tensor_shape(name))
            nbytes = math.prod(shape) * self._dtypes[name].itemsize
            if name in self._bound_bytes:
                if nbytes > self._bound_bytes[name]:
                    raise ValueError(f"output {name} of shape {shape} does not fit the buffer bound to it")
                continue
            if nbytes > self._max_bytes(name) and name in self._host_outputs:
                logger.warning("output %s of shape %s is larger than the profile's maximum; growing its buffer",
                               name, shape)
            self._set_address(name, self._room(name, max(nbytes, self._max_bytes(name))).ptr)
        if not self.context.execute_async_v3(cuda.stream_handle):
            raise RuntimeError(f"TensorRT failed to run {self.engine_path.name}; see the log")
        self._results = {name: cuda.to_host(self._staging[name].ptr, np.empty(shapes[name], self._dtypes[name]))
                         for name in self._host_outputs}
        cuda.synchronize()

    def output(self, name: str) -> np.ndarray:
        return self._results[name]


class TensorRTBackend(CudaBuffersBackend):
    """See the module docstring. ``settings``: ``max_batch_size``, ``max_length``, ``pages`` (the engine's limits),
    ``fp16`` (build with float16 layers; default: the artifact's encoding is float16), ``workspace_bytes``."""

    name = "tensorrt"
    install_hint = TENSORRT_HINT

    def __init__(self, settings: dict[str, Any] | None = None, num_threads: int = 1, device_index: int = 0):
        super().__init__(settings, num_threads, device_index)
        self.trt = import_tensorrt(f"the {self.name} backend")
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.trt.init_libnvinfer_plugins(self.logger, "")

    def engine_path(self, artifact: Artifact) -> Path:
        """The artifact's current engine for this device: any one, when the settings name no limits; else one that
        covers them, built and recorded in the artifact first when there is none."""
        from ember.compiler.cuda_device import CudaUnavailable, probe_cuda_device
        from ember.compiler.engine_files import select_engine
        from ember.compiler.tensorrt_engine import (
            TensorRTUnavailable,
            ensure_engine,
            tensorrt_version,
        )

        try:
            device = probe_cuda_device(self.device_index)
            version = tensorrt_version()
        except (CudaUnavailable, TensorRTUnavailable) as error:
            raise DeviceUnavailable(f"the {self.name} backend: {error}") from None
        fp16 = self.settings.get("fp16")
        if not any(k in self.settings for k in ("max_batch_size", "max_length", "pages")):
            path = select_engine(artifact, device, version, fp16=fp16)
            if path is not None:
                return path
        logger.info("building a TensorRT engine of %s for %s (once per device kind)", artifact.path, device.kind_key)
        return ensure_engine(artifact, device, **engine_limits(artifact.manifest, self.settings), fp16=fp16,
                             workspace_bytes=self.settings.get("workspace_bytes"))

    def load(self, artifact: Artifact, rank: int = 0) -> TensorRTModel:
        if rank != 0:
            raise ValueError(f"TensorRT engines are built from rank 0's model; rank {rank} was asked for")
        start = time.perf_counter()
        path = self.engine_path(artifact)
        self.cuda.activate()
        engine = self.trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT {self.trt.__version__} could not deserialize {path}; see the log")
        seconds = time.perf_counter() - start
        logger.info("loaded %s on cuda:%d in %.2f s", path, self.device_index, seconds)
        return TensorRTModel(self, engine, artifact.manifest.get("graph", {}), seconds, path)

    def run_graph(self, model_path: Path, inputs: dict[str, np.ndarray],
                  in_place: dict[str, tuple[str, np.ndarray]]) -> None:
        # Compile-time calibration runs the float graph before any engine exists; building an engine for each
        # calibration graph would cost minutes per prompt length. The graph is the ONNX a CUDA onnxruntime runs.
        from .ort_cuda import OrtCudaBackend

        OrtCudaBackend(self.settings.get("calibration_settings", {}), self.num_threads,
                       self.device_index).run_graph(model_path, inputs, in_place)


__all__ = ["TensorRTBackend", "TensorRTModel", "engine_limits", "import_tensorrt", "max_output_shape",
           "numpy_dtype_of", "symbolic_maxima", "trt_dtype_name"]
