"""CUDA device memory for the GPU backends (``onnxruntime-cuda``, ``tensorrt``): allocation, row views, row copies,
host transfers, one stream per backend, and free memory, through ``cuda-python``'s runtime bindings
(``cuda.bindings.runtime``; ``cuda.cudart`` in cuda-python before 12.6).

cuda-python is an optional dependency (``pip install 'ember[cuda]'``), imported on first use: this module imports
on a CPU-only install, and a backend constructed there fails with :class:`DeviceUnavailable`, one line that says
what is missing (the package, the driver, the device).

What can be checked without a GPU is pure arithmetic, kept apart from the calls: :func:`row_range` (the rows a
view covers), :func:`row_regions` (the bytes of one row that ``within`` selects, as strided 2-D blocks) and
:func:`copy_plan` (a row copy as ``cudaMemcpy2DAsync`` calls; a swap goes through a staging buffer so that every
source is read before any destination is written, as the CPU backend's numpy assignment does).
"""
from __future__ import annotations

import abc
import contextlib
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Buffer, RuntimeBackend, same_size

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ember[cuda]'"


class DeviceUnavailable(RuntimeError):
    """A GPU backend cannot run here: the message says what is missing (package, driver, device), in one line."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed: the call, the device and CUDA's own error name and text."""


def host_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as numpy's; ``"bfloat16"`` through ``ml_dtypes`` (an onnx dependency), which numpy lacks."""
    try:
        return np.dtype(dtype)
    except TypeError:
        if str(dtype) != "bfloat16":
            raise
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)


# pure arithmetic ---------------------------------------------------------------------------------------------------
def row_range(rows: int, start: int | None, stop: int | None) -> tuple[int, int]:
    """``(first row, row count)`` of ``buffer[start:stop]`` along the first axis of ``rows`` rows (Python's slice
    rules: None for an end, negative from the end, clipped to the buffer)."""
    first, last, _ = slice(start, stop).indices(rows)
    return first, max(0, last - first)


@dataclass(frozen=True)
class Region:
    """Bytes of one row: ``height`` runs of ``width`` contiguous bytes, ``pitch`` bytes apart, from ``offset``."""

    offset: int
    width: int
    height: int = 1
    pitch: int = 0


def _axis_range(index: Any, size: int, axis: int) -> tuple[int, int]:
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if step != 1:
            raise ValueError(f"row copies take contiguous ranges; axis {axis} has step {step}")
        return start, max(start, stop)
    if isinstance(index, (int, np.integer)):
        position = int(index) + size if index < 0 else int(index)
        if not 0 <= position < size:
            raise IndexError(f"index {index} is out of range for axis {axis} of size {size}")
        return position, position + 1
    raise TypeError(f"row copies index the other axes with slices or integers, not {type(index).__name__}")


def row_regions(shape: Sequence[int], itemsize: int, within: tuple = ()) -> list[Region]:
    """The bytes of one row of a C-contiguous ``shape`` buffer that ``row[within]`` selects (``within`` indexes
    the axes after the first with slices of step 1 or integers; axes it leaves out are whole).

    The innermost partial axis and the whole axes after it make each run contiguous; the axis before it becomes
    the runs' height (one ``cudaMemcpy2D``); any axes further out give one region per index."""
    dims = [int(d) for d in shape[1:]]
    if len(within) > len(dims):
        raise IndexError(f"{len(within)} indices for the {len(dims)} axes after the first")
    ranges = [_axis_range(i, d, a + 1) for a, (i, d) in enumerate(zip(within, dims))]
    ranges += [(0, d) for d in dims[len(ranges):]]
    strides = [itemsize * math.prod(dims[a + 1:]) for a in range(len(dims))]
    if any(stop <= start for start, stop in ranges):
        return []
    partial = [a for a, (start, stop) in enumerate(ranges) if (start, stop) != (0, dims[a])]
    if not partial:
        return [Region(0, itemsize * math.prod(dims), 1, itemsize * math.prod(dims))]
    inner = partial[-1]
    width = (ranges[inner][1] - ranges[inner][0]) * strides[inner]
    base = ranges[inner][0] * strides[inner]
    if inner == 0:
        return [Region(base, width, 1, width)]
    height_axis = inner - 1
    low, high = ranges[height_axis]
    regions = []
    for outer in np.ndindex(*[stop - start for start, stop in ranges[:height_axis]]):
        offset = base + low * strides[height_axis] + sum(
            (ranges[a][0] + i) * strides[a] for a, i in enumerate(outer))
        regions.append(Region(offset, width, high - low, strides[height_axis]))
    return regions


@dataclass(frozen=True)
class Copy:
    """One ``cudaMemcpy2DAsync``: ``height`` runs of ``width`` bytes from ``src`` (pitch ``src_pitch``) to ``dst``
    (pitch ``dst_pitch``); offsets are into the buffer, or into the staging buffer where ``*_temp``."""

    dst: int
    src: int
    width: int
    height: int = 1
    dst_pitch: int = 0
    src_pitch: int = 0
    dst_temp: bool = False
    src_temp: bool = False


@dataclass(frozen=True)
class CopyPlan:
    """A row copy as device copies, and the staging bytes it needs (0: none; the copies then run in any order)."""

    copies: tuple[Copy, ...]
    temp_bytes: int = 0


def copy_plan(shape: Sequence[int], itemsize: int, dst: Sequence[int], src: Sequence[int],
              within: tuple = ()) -> CopyPlan:
    """The copies that make ``buffer[dst][within] = buffer[src][within]`` along the first axis, with numpy's
    meaning: every source is read before any destination is written (a swap ``dst=[a, b], src=[b, a]``), and of
    repeated destinations the last pair wins.

    Pairs whose rows do not overlap copy directly (consecutive whole rows as one copy); when a destination row is
    also a source row, every source region is first packed into a staging buffer, then unpacked."""
    rows = int(shape[0])
    dst, src = [int(r) for r in dst], [int(r) for r in src]
    if len(dst) != len(src):
        raise ValueError(f"{len(dst)} destination rows for {len(src)} source rows")
    for row in (*dst, *src):
        if not 0 <= row < rows:
            raise IndexError(f"row {row} is out of range for a buffer of {rows} rows")
    last = dict(zip(dst, src))  # the last pair of a repeated destination wins, as in numpy
    pairs = [(d, s) for d, s in last.items() if d != s]
    regions = row_regions(shape, itemsize, within)
    if not pairs or not regions:
        return CopyPlan(())
    row_bytes = itemsize * math.prod(int(d) for d in shape[1:])
    if {d for d, _ in pairs} & {s for _, s in pairs}:
        packed = sum(r.width * r.height for r in regions)
        stage, unstage = [], []
        for i, (d, s) in enumerate(pairs):
            t = i * packed
            for r in regions:
                stage.append(Copy(t, s * row_bytes + r.offset, r.width, r.height, r.width, r.pitch, dst_temp=True))
                unstage.append(Copy(d * row_bytes + r.offset, t, r.width, r.height, r.pitch, r.width, src_temp=True))
                t += r.width * r.height
        return CopyPlan(tuple(stage + unstage), packed * len(pairs))
    if regions == [Region(0, row_bytes, 1, row_bytes)]:  # whole rows: runs of consecutive rows in one copy
        copies, run = [], [pairs[0]]
        for d, s in pairs[1:]:
            if d == run[-1][0] + 1 and s == run[-1][1] + 1:
                run.append((d, s))
                continue
            copies.append(_whole_rows(run, row_bytes))
            run = [(d, s)]
        copies.append(_whole_rows(run, row_bytes))
        return CopyPlan(tuple(copies))
    return CopyPlan(tuple(Copy(d * row_bytes + r.offset, s * row_bytes + r.offset, r.width, r.height, r.pitch, r.pitch)
                          for d, s in pairs for r in regions))


def _whole_rows(run: list[tuple[int, int]], row_bytes: int) -> Copy:
    width = len(run) * row_bytes
    return Copy(run[0][0] * row_bytes, run[0][1] * row_bytes, width, 1, width, width)


# the CUDA runtime --------------------------------------------------------------------------------------------------
def cudart(what: str, hint: str = INSTALL_HINT) -> Any:
    """cuda-python's CUDA runtime module; DeviceUnavailable naming ``what`` needs it when it is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python 12.0 - 12.5
        except ImportError:
            raise DeviceUnavailable(f"{what} needs cuda-python, which is not installed ({hint})") from None
    return runtime


def _error_text(rt: Any, error: Any) -> str:
    name = rt.cudaGetErrorName(error)[1]
    text = rt.cudaGetErrorString(error)[1]
    decode = (lambda b: b.decode(errors="replace") if isinstance(b, bytes) else str(b))
    return f"{decode(name)}: {decode(text)}"


class CudaDevice:
    """One device's CUDA runtime: made current before each call, and a stream of its own for every copy (the
    GPU backends run their engines on the same stream, so copies and runs are ordered without extra syncs)."""

    #: cudaError_t values that mean "no usable GPU here" rather than a failed call.
    _ABSENT = ("cudaErrorNoDevice", "cudaErrorInsufficientDriver", "cudaErrorInvalidDevice",
               "cudaErrorSystemDriverMismatch", "cudaErrorInitializationError", "cudaErrorCompatNotSupportedOnDevice",
               "cudaErrorDevicesUnavailable", "cudaErrorStubLibrary")

    def __init__(self, index: int, what: str, hint: str = INSTALL_HINT):
        self.index = index
        self.what = what
        self.rt = rt = cudart(what, hint)
        error, count = rt.cudaGetDeviceCount()
        if error != rt.cudaError_t.cudaSuccess:
            raise DeviceUnavailable(f"{what} needs an NVIDIA GPU and its driver: {_error_text(rt, error)}")
        if not 0 <= index < count:
            raise DeviceUnavailable(f"{what}: there is no device cuda:{index}; CUDA sees {count}")
        self.activate()
        self.stream = self.check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def check(self, result: tuple, call: str) -> Any:
        """The values of a cuda-python call's ``(error, *values)``; CudaError unless it succeeded."""
        error, *values = result
        if error != self.rt.cudaError_t.cudaSuccess:
            kind = DeviceUnavailable if getattr(error, "name", "") in self._ABSENT else CudaError
            raise kind(f"{call} failed on cuda:{self.index}: {_error_text(self.rt, error)}")
        return values[0] if len(values) == 1 else tuple(values) or None

    @property
    def stream_handle(self) -> int:
        """The stream as an integer (``cudaStream_t``), what onnxruntime and TensorRT take."""
        return int(self.stream)

    def activate(self) -> None:
        self.check(self.rt.cudaSetDevice(self.index), f"cudaSetDevice({self.index})")

    def allocate(self, nbytes: int) -> DeviceMemory:
        """``nbytes`` of zeroed device memory, freed when the object is collected."""
        self.activate()
        memory = DeviceMemory(self, nbytes)
        if nbytes:
            self.check(self.rt.cudaMemsetAsync(memory.ptr, 0, nbytes, self.stream), "cudaMemsetAsync")
            self.synchronize()
        return memory

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        """Enqueue a 1-D copy; ``kind`` is ``"DeviceToDevice"``, ``"HostToDevice"`` or ``"DeviceToHost"``."""
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, getattr(self.rt.cudaMemcpyKind, f"cudaMemcpy{kind}"),
                                               self.stream), f"cudaMemcpyAsync({kind})")

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        """Enqueue a device-to-device ``cudaMemcpy2DAsync`` (a 1-D copy when ``height`` is 1)."""
        if height == 1:
            self.copy(dst, src, width, "DeviceToDevice")
        elif width and height:
            self.check(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height,
                                                 self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream),
                       "cudaMemcpy2DAsync")

    def from_host(self, dst: int, array: np.ndarray) -> None:
        """Copy a host array to ``dst`` (synchronous for pageable memory: the array may change after)."""
        array = np.ascontiguousarray(array)
        self.copy(dst, array.ctypes.data, array.nbytes, "HostToDevice")
        self.synchronize()

    def to_host(self, src: int, out: np.ndarray) -> np.ndarray:
        """Fill the C-contiguous host array ``out`` from ``src``, after the work already on the stream."""
        self.copy(out.ctypes.data, src, out.nbytes, "DeviceToHost")
        self.synchronize()
        return out

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def memory_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes of the device (``cudaMemGetInfo``)."""
        self.activate()
        free, total = self.check(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)


def _free(rt: Any, index: int, ptr: int) -> None:
    with contextlib.suppress(Exception):  # at interpreter exit the context may be gone: nothing left to free
        rt.cudaSetDevice(index)
        rt.cudaFree(ptr)


class DeviceMemory:
    """``nbytes`` of device memory at ``ptr`` (``cudaMalloc``), freed when collected."""

    def __init__(self, device: CudaDevice, nbytes: int):
        self.device = device
        self.nbytes = int(nbytes)
        self.ptr = int(device.check(device.rt.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})")) if nbytes else 0
        if self.ptr:
            weakref.finalize(self, _free, device.rt, device.index, self.ptr)


@dataclass(frozen=True)
class DeviceView:
    """What binds rows of a device buffer by address: the first byte, the rows' shape and dtype, the device."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device_index: int
    memory: Any = None  # the DeviceMemory it lies in, kept alive with the view

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class CudaBuffersBackend(RuntimeBackend, abc.ABC):
    """The part of a GPU backend that owns memory: buffers are device memory on ``cuda:device_index``, views are
    addresses, row copies are device-to-device copies on the backend's stream, ``to_host`` copies back; the KV
    cache may take half the free device memory. Subclasses load and run graphs."""

    device_kind = "cuda"
    install_hint = INSTALL_HINT  # how to install what the backend needs

    def __init__(self, settings: dict[str, Any] | None = None, num_threads: int = 1, device_index: int = 0):
        super().__init__(settings, num_threads, device_index)
        self.cuda = CudaDevice(device_index, f"the {self.name} backend", self.install_hint)
        self._temp: DeviceMemory | None = None

    def allocate(self, shape: Sequence[int], dtype: Any) -> Buffer:
        shape, dtype = tuple(int(d) for d in shape), host_dtype(dtype)
        memory = self.cuda.allocate(math.prod(shape) * dtype.itemsize)
        return Buffer(shape, dtype, memory)

    def view(self, buffer: Buffer, start: int | None = None, stop: int | None = None, *,
             shape: Sequence[int] | None = None) -> DeviceView:
        first, count = row_range(buffer.shape[0], start, stop)
        row_bytes = math.prod(buffer.shape[1:]) * np.dtype(buffer.dtype).itemsize
        rows = (count, *buffer.shape[1:])
        return DeviceView(buffer.handle.ptr + first * row_bytes, rows if shape is None else same_size(rows, shape),
                          buffer.dtype, self.device_index, buffer.handle)

    def copy_rows(self, buffer: Buffer, dst: Sequence[int], src: Sequence[int], within: tuple = ()) -> None:
        plan = copy_plan(buffer.shape, np.dtype(buffer.dtype).itemsize, dst, src, within)
        if not plan.copies:
            return
        self.cuda.activate()
        if plan.temp_bytes and (self._temp is None or self._temp.nbytes < plan.temp_bytes):
            self._temp = self.cuda.allocate(plan.temp_bytes)
        base, temp = buffer.handle.ptr, self._temp.ptr if plan.temp_bytes and self._temp is not None else 0
        for c in plan.copies:
            self.cuda.copy_2d((temp if c.dst_temp else base) + c.dst, c.dst_pitch,
                              (temp if c.src_temp else base) + c.src, c.src_pitch, c.width, c.height)
        self.cuda.synchronize()

    def to_host(self, buffer: Buffer, start: int | None = None, stop: int | None = None) -> np.ndarray:
        view = self.view(buffer, start, stop)
        self.cuda.activate()
        return self.cuda.to_host(view.ptr, np.empty(view.shape, buffer.dtype))

    def available_memory(self) -> int:
        return self.cuda.memory_info()[0] // 2


__all__ = ["Copy", "CopyPlan", "CudaBuffersBackend", "CudaDevice", "CudaError", "DeviceMemory", "DeviceUnavailable",
           "DeviceView", "Region", "copy_plan", "cudart", "host_dtype", "row_range", "row_regions"]
