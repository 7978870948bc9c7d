"""The communicator: the collectives of a step between a tensor-parallel model's ranks (DESIGN.md: distribution).

:class:`Communicator` is what a rank's stage runner (``staged_model.py``) needs: a sum and a gather over numpy
arrays, in place where it can be. :class:`TorchDistributedCommunicator` is the one implementation: torch.distributed
over gloo, started from an ``init_method`` (the ranks this process spawned) or torchrun's environment. ember
writes no transport of its own.

Operands: host arrays go over gloo. A GPU artifact's ranks (manifest ``tensor_parallel.backend`` "nccl") also open a
NCCL group (:meth:`Communicator.open_device_group`, once the artifact is known: every rank in the same order), and
their operands are the device buffers their stages wrote, lent to torch without a copy (``device_tensors.py``).
The gloo group stays for everything on the host: the step channel, the heartbeats' store.

Failure: a collective that cannot complete raises :class:`RankFailure` within the group's timeout (30 s by
default): a rank that died closes its connections and the others fail at once; a rank that hangs is waited for until
the timeout. Either way the message names the rank where it can be found: every rank beats once a second into the
group's store (hosted by rank 0), and a rank whose beat stopped is the one named (gloo's own ``monitored_barrier``
cannot tell after a timeout: the timed-out pair is closed); a rank that cannot reach the store names rank 0.
"""
from __future__ import annotations

import abc
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np

from ..backends.cuda_memory import DeviceView
from .device_tensors import as_torch, from_torch

logger = logging.getLogger(__name__)

#: Seconds between a rank's heartbeats in the group's store (what names a rank that stopped).
HEARTBEAT_S = 1.0
#: A collective's operand: a host array (gloo) or a device buffer (NCCL).
Operand = np.ndarray | DeviceView
INSTALL_HINT = "tensor parallelism needs torch: pip install 'ember[distributed]'"


class RankFailure(RuntimeError):
    """A rank died, hung past the timeout, or broke the group; the message names the rank when it is known."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


@dataclass
class CollectiveStats:
    """Per op (``all_reduce``, ``all_gather``, ``broadcast``): calls, payload bytes this rank put in, seconds inside."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def record(self, op: str, nbytes: int, seconds: float) -> None:
        self.calls[op] += 1
        self.bytes[op] += int(nbytes)
        self.seconds[op] += seconds

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()

    def to_json(self) -> dict[str, dict[str, float]]:
        return {op: {"calls": self.calls[op], "bytes": self.bytes[op], "seconds": self.seconds[op]}
                for op in self.calls}


class Communicator(abc.ABC):
    """The collectives of a step, between ``world_size`` ranks (see the module docstring)."""

    rank: int
    world_size: int
    stats: CollectiveStats

    @abc.abstractmethod
    def all_reduce(self, array: Operand) -> None:
        """Sum over the ranks, in place (a C-contiguous array, or a device buffer, of the same shape on every
        rank)."""

    @abc.abstractmethod
    def all_gather(self, array: Operand, axis: int) -> Operand:
        """The ranks' arrays (the same shape on every rank) concatenated along ``axis`` in rank order (on the host
        or the device, as ``array`` is)."""

    @abc.abstractmethod
    def open_device_group(self, backend: str, device_index: int) -> None:
        """Join the group that runs collectives on device buffers (``"nccl"``) with this rank on
        ``cuda:<device_index>``: every rank calls it, in the same order relative to its other groups."""

    @abc.abstractmethod
    def silent_ranks(self) -> list[int] | None:
        """The other ranks that stopped answering (dead or stopped), to name in an error; None when that cannot be
        known (the place that keeps track is gone)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the group (idempotent)."""


def torch_distributed() -> Any:
    """``(torch, torch.distributed)``, or an ImportError saying which extra to install."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return torch, dist


class TorchDistributedCommunicator(Communicator):
    """torch.distributed's default process group (module docstring). ``timeout_s`` bounds every collective."""

    def __init__(self, rank: int, world_size: int, init_method: str, timeout_s: float = 30.0,
                 backend: str = "gloo", rendezvous_timeout_s: float = 120.0):
        """``rendezvous_timeout_s`` bounds the wait for the other ranks to join (under torchrun, rank 0 joins after
        it has compiled the model); ``timeout_s`` every collective after that (they run on their own group)."""
        self.torch, self.dist = torch_distributed()
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.stats = CollectiveStats()
        self._closed = False
        self.device_group: Any = None  # open_device_group's (NCCL)
        self.device: Any = None
        joining = timedelta(seconds=max(timeout_s, rendezvous_timeout_s))
        # The rendezvous made here (what init_process_group does with an init_method), so that the heartbeats get
        # the group's store through public API: their keys under "ember/", the group's under its own prefix.
        store, _, _ = next(self.dist.rendezvous(init_method, rank, world_size, timeout=joining))
        store.set_timeout(joining)
        self.dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=joining)
        self.group = self.dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        self._store = self.dist.PrefixStore("ember", store)
        self._store.set(f"heartbeat/{rank}", repr(time.time()))
        threading.Thread(target=self._heartbeat, name="ember-heartbeat", daemon=True).start()

    @classmethod
    def from_environment(cls, timeout_s: float = 30.0, backend: str = "gloo",
                         rendezvous_timeout_s: float = 3600.0) -> "TorchDistributedCommunicator":
        """The group torchrun's environment names (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); the
        ranks above 0 wait up to an hour for rank 0, which compiles the model first when the cache has none."""
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", timeout_s, backend,
                   rendezvous_timeout_s)

    def _heartbeat(self) -> None:
        """Every second, this rank's clock into the group's store: when a collective fails, the ranks whose beat
        stopped (dead, or stopped as a whole: SIGSTOP, a debugger) are the ones to name."""
        store = self._store
        key = f"heartbeat/{self.rank}"
        while not self._closed:
            try:
                store.set(key, repr(time.time()))
            except Exception:  # noqa: BLE001 - the store's host (rank 0) is gone: nothing left to tell
                return
            time.sleep(HEARTBEAT_S)

    def silent_ranks(self) -> list[int] | None:
        """Ranks whose heartbeat is older than a few beats (after waiting for two, so that a rank that just died
        shows); None when the store cannot be read (it lives in rank 0's process: rank 0 is gone)."""
        time.sleep(2 * HEARTBEAT_S)
        now, silent = time.time(), []
        try:
            for rank in range(self.world_size):
                if rank != self.rank and now - float(self._store.get(f"heartbeat/{rank}")) > 3 * HEARTBEAT_S:
                    silent.append(rank)
        except Exception:  # noqa: BLE001 - the store lives in rank 0's process
            return None
        return silent

    def _failure(self, error: BaseException) -> RankFailure:
        """The failure of a collective, naming the rank that stopped where the heartbeats tell."""
        silent = self.silent_ranks()
        missing: int | None = 0 if silent is None else (silent[0] if silent else None)
        who = f"rank {missing}" if missing is not None else "another rank"
        first_line = str(error).splitlines()[0] if str(error) else ""
        return RankFailure(f"tensor-parallel rank {self.rank}: {who} of {self.world_size} failed or stopped "
                           f"answering ({type(error).__name__}: {first_line})", missing)

    def _run(self, op: str, operand: Operand, call: Any) -> Any:
        """``call`` timed and recorded, a failure named; on a device, the device's work finished after it (the
        rank's next stage runs on the backend's own stream, which does not wait for torch's)."""
        start = time.perf_counter()
        try:
            result = call()
            if self.device is not None and not isinstance(operand, np.ndarray):
                self.torch.cuda.synchronize(self.device)
        except Exception as error:  # noqa: BLE001 - gloo's errors are RuntimeErrors of several kinds
            raise self._failure(error) from error
        self.stats.record(op, operand.nbytes, time.perf_counter() - start)
        return result

    def open_device_group(self, backend: str, device_index: int) -> None:
        """See :meth:`Communicator.open_device_group`. NCCL's ``wait`` is made blocking (``TORCH_NCCL_BLOCKING_WAIT``,
        read when the group is made), so a collective that a dead or hung rank stalls raises here after the timeout,
        like gloo's, instead of the watchdog tearing the process down."""
        if backend != "nccl":
            raise ValueError(f"device collectives run over NCCL; the artifact asks for {backend!r}")
        if not (self.torch.cuda.is_available() and self.dist.is_nccl_available()):
            raise RuntimeError(f"tensor-parallel rank {self.rank}: this artifact's collectives run over NCCL on CUDA "
                               f"devices; this torch ({self.torch.__version__}) has "
                               f"{'no NCCL' if self.torch.cuda.is_available() else 'no CUDA device'}")
        if device_index >= self.torch.cuda.device_count():
            raise RuntimeError(f"tensor-parallel rank {self.rank} runs on cuda:{device_index}; this host has "
                               f"{self.torch.cuda.device_count()} CUDA device(s)")
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        self.device = self.torch.device("cuda", device_index)
        self.torch.cuda.set_device(self.device)
        self.device_group = self.dist.new_group(backend="nccl", timeout=timedelta(seconds=self.timeout_s))

    def _group_of(self, array: Operand) -> Any:
        if isinstance(array, np.ndarray):
            return self.group
        if self.device_group is None:
            raise RuntimeError("a collective on device buffers needs the NCCL group (open_device_group)")
        return self.device_group

    def all_reduce(self, array: Operand) -> None:
        if isinstance(array, np.ndarray) and (not array.flags.c_contiguous or not array.flags.writeable):
            raise ValueError("all_reduce works in place on a C-contiguous, writeable array")
        group = self._group_of(array)
        tensor = as_torch(self.torch, array)  # shares the operand's memory: the sum lands in it
        self._run("all_reduce", array, lambda: self.dist.all_reduce(tensor, group=group))

    def all_gather(self, array: Operand, axis: int) -> Operand:
        if isinstance(array, np.ndarray):
            array = np.ascontiguousarray(array)
        group = self._group_of(array)
        tensor = as_torch(self.torch, array)
        parts = [self.torch.empty_like(tensor) for _ in range(self.world_size)]

        def gather() -> Any:
            self.dist.all_gather(parts, tensor, group=group)
            return self.torch.cat(parts, dim=axis)
        return from_torch(self._run("all_gather", array, gather), array)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.dist.is_initialized():
                self.dist.destroy_process_group()
        except Exception as error:  # noqa: BLE001 - leaving a broken group
            logger.debug("destroying the process group: %s", error)
