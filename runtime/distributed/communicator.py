"""The communicator: the collectives of a step between a tensor-parallel model's ranks (DESIGN.md: distribution).

:class:`Communicator` is what a rank's stage runner (``staged_model.py``) needs: a sum and a gather over numpy
arrays, in place where it can be. :class:`TorchDistributedCommunicator` is the one implementation: torch.distributed
(gloo on CPU; NCCL is its GPU backend, chosen by ``backend``), started from an ``init_method`` (the ranks this
process spawned) or torchrun's environment. ember writes no transport of its own.

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

logger = logging.getLogger(__name__)

#: Seconds between a rank's heartbeats in the group's store (what names a rank that stopped).
HEARTBEAT_S = 1.0
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
    def all_reduce(self, array: np.ndarray) -> None:
        """Sum over the ranks, in place (a C-contiguous array of the same shape on every rank)."""

    @abc.abstractmethod
    def all_gather(self, array: np.ndarray, axis: int) -> np.ndarray:
        """The ranks' arrays (the same shape on every rank) concatenated along ``axis`` in rank order."""

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
        self.dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                     timeout=timedelta(seconds=max(timeout_s, rendezvous_timeout_s)))
        self.group = self.dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        from torch.distributed.distributed_c10d import _get_default_store

        self._store = _get_default_store()
        self._store.set(f"ember/heartbeat/{rank}", repr(time.time()))
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
        key = f"ember/heartbeat/{self.rank}"
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
                if rank != self.rank and now - float(self._store.get(f"ember/heartbeat/{rank}")) > 3 * HEARTBEAT_S:
                    silent.append(rank)
        except Exception:  # noqa: BLE001 - the store lives in rank 0's process
            return None
        return silent

    def _failure(self, error: BaseException) -> RankFailure:
        """The failure of a collective, naming the rank that stopped where the heartbeats tell."""
        silent = self.silent_ranks()
        if silent is None:
            missing = 0
        else:
            missing = silent[0] if silent else None
        who = f"rank {missing}" if missing is not None else "another rank"
        first_line = str(error).splitlines()[0] if str(error) else ""
        return RankFailure(f"tensor-parallel rank {self.rank}: {who} of {self.world_size} failed or stopped "
                           f"answering ({type(error).__name__}: {first_line})", missing)

    def _run(self, op: str, nbytes: int, call: Any) -> Any:
        start = time.perf_counter()
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - gloo's errors are RuntimeErrors of several kinds
            raise self._failure(error) from error
        self.stats.record(op, nbytes, time.perf_counter() - start)
        return result

    def all_reduce(self, array: np.ndarray) -> None:
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError("all_reduce works in place on a C-contiguous, writeable array")
        tensor = self.torch.from_numpy(array)  # shares the array's memory: the sum lands in it
        self._run("all_reduce", array.nbytes, lambda: self.dist.all_reduce(tensor, group=self.group))

    def all_gather(self, array: np.ndarray, axis: int) -> np.ndarray:
        tensor = self.torch.from_numpy(np.ascontiguousarray(array))
        parts = [self.torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run("all_gather", tensor.nbytes, lambda: self.dist.all_gather(parts, tensor, group=self.group))
        return np.concatenate([p.numpy() for p in parts], axis=axis)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.dist.is_initialized():
                self.dist.destroy_process_group()
        except Exception as error:  # noqa: BLE001 - leaving a broken group
            logger.debug("destroying the process group: %s", error)
