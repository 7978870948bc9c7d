"""What a CUDA device is, asked of the driver itself: the key that TensorRT engines are filed under.

A TensorRT engine runs only on the GPU model it was built for (its kernels are chosen and tuned for that compute
capability and that chip), so an artifact keeps one engine per *device kind* (:mod:`.engine_files`). The kind is
the driver's name of the device and its compute capability, e.g. ``nvidia-h100-80gb-hbm3-sm90``.

The driver is asked through ``ctypes`` on ``libcuda.so.1`` (``cuInit``, ``cuDeviceGet``, ``cuDeviceGetName``,
``cuDeviceGetAttribute``, ``cuDeviceTotalMem_v2``): no Python CUDA package is needed, and a machine without a
driver or without the device gets :class:`CudaUnavailable`, one line that says which.
"""
from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: The driver library (the soname every CUDA driver installs).
DRIVER = "libcuda.so.1"

#: ``CUdevice_attribute`` values (cuda.h).
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76

_CUDA_SUCCESS = 0
_NAME_BYTES = 256


class CudaUnavailable(RuntimeError):
    """No CUDA driver, or no such device: the message says which, in one line."""


def slug(text: str) -> str:
    """``text`` as a file-name part: lower case, each run of other characters than letters and digits one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class DeviceDescription:
    """One CUDA device as the driver describes it. ``index`` is where it is on this host (``cuda:N``); the rest is
    what the device *is*, the same on every host that has that GPU model."""

    name: str
    sm_major: int
    sm_minor: int
    total_memory: int  # bytes
    index: int = 0

    @property
    def kind_key(self) -> str:
        """The device kind engines are filed under: the name's slug and the compute capability
        (``NVIDIA H100 80GB HBM3``, 9.0 -> ``nvidia-h100-80gb-hbm3-sm90``)."""
        return f"{slug(self.name) or 'cuda-device'}-sm{self.sm_major}{self.sm_minor}"

    def to_json(self) -> dict[str, Any]:
        """What an engine records of the device it was built for (not the index: that is this host's)."""
        return {"kind": self.kind_key, "name": self.name, "sm_major": self.sm_major, "sm_minor": self.sm_minor,
                "total_memory": self.total_memory}


def _driver(library: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(library)
    except OSError as error:
        raise CudaUnavailable(f"no CUDA driver: {library} cannot be loaded ({error})") from None


def _check(cuda: ctypes.CDLL, status: int, call: str) -> None:
    if status == _CUDA_SUCCESS:
        return
    name = ctypes.c_char_p()
    found = name.value if cuda.cuGetErrorName(status, ctypes.byref(name)) == _CUDA_SUCCESS else None
    reason = found.decode() if found else f"error {status}"
    raise CudaUnavailable(f"the CUDA driver failed {call}: {reason}")


def _device_handle(cuda: ctypes.CDLL, index: int) -> ctypes.c_int:
    """The driver's handle of device ``index``, after ``cuInit``; CudaUnavailable if there is no such device."""
    if index < 0:
        raise CudaUnavailable(f"cuda:{index} is not a device index (0 or more)")
    status = cuda.cuInit(0)
    if status == 100:  # CUDA_ERROR_NO_DEVICE
        raise CudaUnavailable("the CUDA driver sees no device")
    _check(cuda, status, "cuInit")
    count = ctypes.c_int()
    _check(cuda, cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if index >= count.value:
        raise CudaUnavailable(f"there is no device cuda:{index}: the CUDA driver sees {count.value} "
                              f"(cuda:0..cuda:{count.value - 1})" if count.value else
                              f"there is no device cuda:{index}: the CUDA driver sees none")
    device = ctypes.c_int()
    _check(cuda, cuda.cuDeviceGet(ctypes.byref(device), index), f"cuDeviceGet({index})")
    return device


def probe_cuda_device(index: int = 0, *, driver: str = DRIVER) -> DeviceDescription:
    """The description of device ``cuda:index``, from the driver; CudaUnavailable (one line) when the driver
    cannot be loaded or initialized or has no such device."""
    cuda = _driver(driver)
    device = _device_handle(cuda, index)
    name = ctypes.create_string_buffer(_NAME_BYTES)
    _check(cuda, cuda.cuDeviceGetName(name, _NAME_BYTES, device), "cuDeviceGetName")
    major, minor, memory = ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
    _check(cuda, cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                           device), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)")
    _check(cuda, cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                           device), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)")
    _check(cuda, cuda.cuDeviceTotalMem_v2(ctypes.byref(memory), device), "cuDeviceTotalMem_v2")
    return DeviceDescription(name=name.value.decode(errors="replace"), sm_major=major.value, sm_minor=minor.value,
                             total_memory=memory.value, index=index)


@contextmanager
def current_device(index: int, *, driver: str = DRIVER) -> Iterator[None]:
    """Make device ``index``'s primary context current on this thread for the block (``cuDevicePrimaryCtxRetain``,
    ``cuCtxPushCurrent_v2``; popped and released after). The CUDA runtime, TensorRT's included, uses the context
    current on the thread, so a TensorRT builder made inside the block builds for that device."""
    cuda = _driver(driver)
    device = _device_handle(cuda, index)
    context = ctypes.c_void_p()
    _check(cuda, cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    try:
        _check(cuda, cuda.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent_v2")
        try:
            yield
        finally:
            cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(device)
