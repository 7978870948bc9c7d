"""torch tensors over the buffers a rank's stages read and write, without a copy: the operands of the collectives.

A stage's output on a GPU is a :class:`~ember.runtime.backends.cuda_memory.DeviceView` (an address, a shape, a
dtype, the device; onnxruntime allocated it, or the backend did). NCCL (through torch.distributed) reduces torch
tensors, so the view is lent to torch through the CUDA array interface (``__cuda_array_interface__``, version 3,
which ``torch.as_tensor`` reads without copying); bfloat16, which the interface cannot name, is lent as int16 and
reinterpreted. A tensor torch made (an all-gather's result) goes back as a view that keeps the tensor alive. On the
host the operands are numpy arrays and torch shares their memory (``torch.from_numpy``).

The arithmetic here (:func:`cuda_array_interface`) is checked without a GPU; the rest needs one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.cuda_memory import DeviceView, host_dtype

#: dtypes the CUDA array interface has no type string for -> the same-sized integer type they are lent as.
_LENT_AS = {"bfloat16": np.dtype("<i2")}


class _Lent:
    """An object torch.as_tensor reads as device memory: a view's address, shape and (lendable) type."""

    def __init__(self, interface: dict[str, Any]):
        self.__cuda_array_interface__ = interface


def cuda_array_interface(view: DeviceView) -> dict[str, Any]:
    """The CUDA array interface of ``view`` (C order, not read-only, no stream to wait on: the backend synchronized
    its stream after the run that wrote it); bfloat16 as int16 (see the module docstring)."""
    dtype = host_dtype(view.dtype)
    lent = _LENT_AS.get(dtype.name, dtype)
    if lent.kind not in "biuf":
        raise TypeError(f"a collective takes numeric tensors, not {dtype}")
    return {"shape": tuple(int(d) for d in view.shape), "typestr": lent.str, "data": (int(view.ptr), False),
            "strides": None, "version": 3}


def torch_dtype(torch: Any, dtype: Any) -> Any:
    """torch's dtype for a numpy dtype (bfloat16 through its name)."""
    return getattr(torch, host_dtype(dtype).name)


def as_torch(torch: Any, value: np.ndarray | DeviceView) -> Any:
    """A torch tensor sharing ``value``'s memory: a host array, or a device view on ``cuda:<its device>``."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    tensor = torch.as_tensor(_Lent(cuda_array_interface(value)), device=torch.device("cuda", value.device_index))
    dtype = host_dtype(value.dtype)
    return tensor.view(torch_dtype(torch, dtype)) if dtype.name in _LENT_AS else tensor


def from_torch(tensor: Any, like: np.ndarray | DeviceView) -> np.ndarray | DeviceView:
    """A tensor torch made, as the kind of value ``like`` is: a host array, or a view on the same device that keeps
    the tensor alive (``memory``)."""
    if isinstance(like, np.ndarray):
        return tensor.numpy()
    return DeviceView(int(tensor.data_ptr()), tuple(int(d) for d in tensor.shape), host_dtype(like.dtype),
                      like.device_index, tensor)
