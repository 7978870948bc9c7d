"""``onnxruntime-cuda``: onnxruntime's CUDA execution provider (``onnxruntime-gpu``), the backend of target
``ort-cuda``.

Buffers are device memory (:mod:`.cuda_memory`): the KV cache lives on the GPU and is bound by address through an
``IOBinding`` kept across calls (``bind_input`` / ``bind_output`` with ``"cuda"``, the device id, the element
type, the shape and the pointer; a view is the pointer of its first row), the same address as a cache input and
as its output, so the kernels update it in place. The small per-step inputs are host arrays
(``bind_cpu_input``: onnxruntime copies them over); logits go to a device buffer bound by address and are copied
back, or, where their shape changes per call, onnxruntime allocates them on the host (``bind_output_to_host``).
onnxruntime runs on the backend's own stream (provider option ``user_compute_stream``), so the backend's copies
and onnxruntime's kernels are ordered on one queue.

CUDA graphs (provider option ``enable_cuda_graph``, asked for by the runtime setting ``enable_cuda_graph``):
onnxruntime captures a run's kernels once and replays them, which removes the per-kernel launch cost of a decode
step. Where onnxruntime allows it (``core/session/inference_session.cc``, ``providers/cuda/cuda_execution_provider.cc``):

* every node of the graph is placed on the CUDA provider, with no control-flow nodes and no copies to the host
  inside it; otherwise creating the session fails, and this backend then loads without CUDA graphs and logs
  onnxruntime's reason;
* every input and output of a captured run is bound by IOBinding to the same device address with the same shape
  on every replay (a replay reads and writes the addresses recorded at capture): so in CUDA graph mode this
  backend copies the per-step host inputs into device buffers it keeps per (input, shape), instead of
  ``bind_cpu_input`` (whose device copy onnxruntime allocates afresh each run);
* several graphs are kept apart by the run option ``gpu_graph_id`` (a run with ``-1`` is not captured).

The decode-step variant: a run whose ``input_ids`` has one token per row, with the bindings (shapes and
addresses) of a step seen before, runs under the graph id of that binding signature (captured on onnxruntime's
first runs of that id, replayed after); prefill runs and signatures past ``cuda_graph_limit`` (16) run with
``-1``. A CONTINUOUS cache bound at another first slot, or a page table of another width, is another signature.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import LoadedModel
from .cuda_memory import (
    INSTALL_HINT,
    CudaBuffersBackend,
    DeviceMemory,
    DeviceUnavailable,
    DeviceView,
    host_dtype,
)

if TYPE_CHECKING:
    from ember.compiler.artifact import Artifact

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
#: ONNX ``TensorProto`` element types onnxruntime takes as integers where numpy has no type (bfloat16).
_ONNX_BFLOAT16 = 16
#: onnxruntime's type names (``tensor(float)``) that numpy spells otherwise.
_ORT_TYPE_NAMES = {"float": "float32", "double": "float64"}
#: The run option that selects (or skips, with -1) a captured CUDA graph.
GRAPH_ID = "gpu_graph_id"
DEFAULT_GRAPH_LIMIT = 16


def ort_element_type(dtype: Any) -> Any:
    """What ``IOBinding.bind_input`` / ``bind_output`` take as ``element_type`` for a buffer of ``dtype``: the numpy
    scalar type, or ONNX's integer for bfloat16 (numpy has none)."""
    dtype = host_dtype(dtype)
    if dtype.name == "bfloat16":
        return _ONNX_BFLOAT16
    if dtype.kind not in "biuf":
        raise TypeError(f"onnxruntime binds no tensors of {dtype}")
    return dtype.type


def numpy_dtype_of(ort_type: str) -> np.dtype:
    """The numpy dtype of an onnxruntime type string (``tensor(float16)`` -> float16)."""
    element = ort_type.removeprefix("tensor(").removesuffix(")")
    return host_dtype(_ORT_TYPE_NAMES.get(element, element))


def import_onnxruntime_cuda(what: str) -> Any:
    """onnxruntime with its CUDA provider; DeviceUnavailable (one line) when the installed build has none."""
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        raise DeviceUnavailable(f"{what} needs onnxruntime-gpu: the installed onnxruntime {ort.__version__} has no "
                                f"{CUDA_PROVIDER} ({INSTALL_HINT})")
    return ort


class OrtCudaModel(LoadedModel):
    """One rank's graph in an ``onnxruntime.InferenceSession`` on the CUDA provider, with an IOBinding kept across
    calls (see the module docstring)."""

    backend: OrtCudaBackend

    def __init__(self, backend: OrtCudaBackend, session: Any, load_seconds: float, cuda_graph: bool):
        self.backend = backend
        self.session = session
        self.load_seconds = load_seconds
        self.cuda_graph = cuda_graph
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._types = {v.name: v.type for v in (*session.get_inputs(), *session.get_outputs())}
        self.binding = session.io_binding()
        self._bound: dict[str, tuple[int, tuple[int, ...]]] = {}  # "in:name" / "out:name" -> (address, shape)
        self._output_order: list[str] = []  # onnxruntime returns outputs in first-bound order
        self._staged: dict[tuple[str, tuple[int, ...], str], DeviceMemory] = {}  # CUDA graphs: fixed input copies
        self._graph_ids: dict[tuple, int] = {}
        self._graph_limit = int(backend.settings.get("cuda_graph_limit", DEFAULT_GRAPH_LIMIT))
        self._decode_step = False
        self._run_options: dict[int, Any] = {}

    def input_dtype(self, name: str) -> np.dtype:
        if name not in self.input_names:
            raise KeyError(f"the graph has no input {name!r}")
        return numpy_dtype_of(self._types[name])

    def bind_input(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if name == "input_ids":
            self._decode_step = array.ndim == 2 and array.shape[1] == 1
        if not self.cuda_graph:
            self.binding.bind_cpu_input(name, array)  # onnxruntime copies it to the device for the run
            self._bound.pop("in:" + name, None)
            return
        key = (name, array.shape, array.dtype.str)
        if key not in self._staged:
            self._staged[key] = self.backend.cuda.allocate(array.nbytes)
        memory = self._staged[key]
        self.backend.cuda.from_host(memory.ptr, array)
        self._bind_address(name, DeviceView(memory.ptr, array.shape, array.dtype, self.backend.device_index, memory),
                           output=False)

    def bind_buffer(self, name: str, view: DeviceView, *, output: bool = False) -> None:
        self._bind_address(name, view, output=output)

    def _bind_address(self, name: str, view: DeviceView, *, output: bool) -> None:
        key = ("out:" if output else "in:") + name
        if self._bound.get(key) == (view.ptr, view.shape):
            return
        args = (name, "cuda", view.device_index, ort_element_type(view.dtype), list(view.shape), view.ptr)
        if output:
            self._note_output(name)
            self.binding.bind_output(*args)
        else:
            self.binding.bind_input(*args)
        self._bound[key] = (view.ptr, view.shape)

    def bind_output_to_host(self, name: str) -> None:
        self._note_output(name)
        self.binding.bind_output(name, "cpu")
        self._bound.pop("out:" + name, None)

    def _note_output(self, name: str) -> None:
        if name not in self._output_order:
            self._output_order.append(name)

    def graph_id(self) -> int:
        """The CUDA graph this run replays or captures (see the module docstring); -1 for none."""
        if not (self.cuda_graph and self._decode_step):
            return -1
        bound = {(key[:key.index(":")], key[key.index(":") + 1:]) for key in self._bound}
        if bound != {("in", n) for n in self.input_names} | {("out", n) for n in self.output_names}:
            return -1  # an unbound input or an output onnxruntime allocates per run cannot be replayed
        signature = tuple(sorted(self._bound.items()))
        if signature not in self._graph_ids:
            if len(self._graph_ids) >= self._graph_limit:
                return -1
            self._graph_ids[signature] = len(self._graph_ids) + 1  # 0 is onnxruntime's default id
        return self._graph_ids[signature]

    def _options(self, graph_id: int) -> Any:
        if graph_id not in self._run_options:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_run_config_entry(GRAPH_ID, str(graph_id))
            self._run_options[graph_id] = options
        return self._run_options[graph_id]

    def run(self) -> None:
        self.backend.cuda.activate()
        if self.cuda_graph:
            self.session.run_with_iobinding(self.binding, self._options(self.graph_id()))
        else:
            self.session.run_with_iobinding(self.binding)
        self.backend.cuda.synchronize()  # outputs in place before anyone reads them

    def output(self, name: str) -> np.ndarray:
        return self.binding.get_outputs()[self._output_order.index(name)].numpy()

    def bind_output_on_device(self, name: str) -> None:
        self._note_output(name)
        self.binding.bind_output(name, "cuda", self.backend.device_index)  # onnxruntime's device allocator
        self._bound.pop("out:" + name, None)

    def device_output(self, name: str) -> DeviceView:
        """The output onnxruntime allocated on the device, by address; the view keeps its OrtValue (and so the
        memory) alive."""
        value = self.binding.get_outputs()[self._output_order.index(name)]
        return DeviceView(int(value.data_ptr()), tuple(int(d) for d in value.shape()), numpy_dtype_of(value.data_type()),
                          self.backend.device_index, value)

    def run_host(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.backend.cuda.activate()
        return self.session.run(list(output_names), feeds)


class OrtCudaBackend(CudaBuffersBackend):
    """See the module docstring. ``settings`` (the manifest's runtime settings): ``providers`` (the target's),
    ``disabled_optimizers``, ``cuda_provider_options`` (more CUDA provider options, as strings),
    ``enable_cuda_graph`` and ``cuda_graph_limit``."""

    name = "onnxruntime-cuda"
    providers = (CUDA_PROVIDER, "CPUExecutionProvider")

    def __init__(self, settings: dict[str, Any] | None = None, num_threads: int = 1, device_index: int = 0):
        self.ort = import_onnxruntime_cuda(f"the {self.name} backend")
        super().__init__(settings, num_threads, device_index)
        self._graph_sessions: dict[Path, Any] = {}

    def provider_options(self, cuda_graph: bool = False) -> dict[str, str]:
        """The CUDA provider's options: this backend's device and stream, CUDA graphs when asked, then the
        manifest's own."""
        options = {"device_id": str(self.device_index), "user_compute_stream": str(self.cuda.stream_handle)}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        options.update({k: str(v) for k, v in self.settings.get("cuda_provider_options", {}).items()})
        return options

    def session_options(self) -> Any:
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads  # the CPU provider's nodes, if any
        options.inter_op_num_threads = 1
        options.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return options

    def _session(self, model_path: Path, cuda_graph: bool = False) -> Any:
        providers = [(name, self.provider_options(cuda_graph)) if name == CUDA_PROVIDER else name
                     for name in self.settings.get("providers", self.providers)]
        self.cuda.activate()
        return self.ort.InferenceSession(str(model_path), sess_options=self.session_options(), providers=providers,
                                         disabled_optimizers=list(self.settings.get("disabled_optimizers", [])))

    def load(self, artifact: Artifact, rank: int = 0) -> OrtCudaModel:
        model = self.load_file(artifact.rank_model(rank))
        logger.info("loaded %s (rank %d) on cuda:%d in %.2f s%s", artifact.path, rank, self.device_index,
                    model.load_seconds, " with CUDA graphs" if model.cuda_graph else "")
        return model

    def load_file(self, path: Path) -> OrtCudaModel:
        """One model file of a verified artifact (a tensor-parallel rank's stage: ``runtime/distributed/``)."""
        start = time.perf_counter()
        cuda_graph = bool(self.settings.get("enable_cuda_graph"))
        try:
            session = self._session(path, cuda_graph)
        except Exception as error:
            if not cuda_graph:
                raise
            logger.warning("%s: onnxruntime cannot capture CUDA graphs of this model (%s); loading without",
                           path, str(error).splitlines()[0])
            session, cuda_graph = self._session(path), False
        if CUDA_PROVIDER not in session.get_providers():
            raise DeviceUnavailable(f"onnxruntime did not start its {CUDA_PROVIDER} on cuda:{self.device_index} "
                                    f"for {path} (providers: {', '.join(session.get_providers())})")
        return OrtCudaModel(self, session, time.perf_counter() - start, cuda_graph)

    def run_graph(self, model_path: Path, inputs: dict[str, np.ndarray],
                  in_place: dict[str, tuple[str, np.ndarray]]) -> None:
        if model_path not in self._graph_sessions:
            self._graph_sessions[model_path] = self._session(model_path)
        session = self._graph_sessions[model_path]
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        states, bound = [], set()
        for name, (output, array) in in_place.items():
            memory = self.cuda.allocate(array.nbytes)
            self.cuda.from_host(memory.ptr, array)
            args = ("cuda", self.device_index, ort_element_type(array.dtype), list(array.shape), memory.ptr)
            binding.bind_input(name, *args)
            binding.bind_output(output, *args)  # shared, as the runtime binds the KV cache
            states.append((memory, array))
            bound.add(output)
        for output in session.get_outputs():
            if output.name not in bound:
                binding.bind_output(output.name, "cuda", self.device_index)  # discarded
        self.cuda.activate()
        session.run_with_iobinding(binding)
        for memory, array in states:
            array[...] = self.cuda.to_host(memory.ptr, np.empty(array.shape, array.dtype))


__all__ = ["OrtCudaBackend", "OrtCudaModel", "import_onnxruntime_cuda", "numpy_dtype_of", "ort_element_type"]
