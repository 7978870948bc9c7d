"""The ranks of a tensor-parallel group on one machine: child processes of rank 0, never left behind.

Ranks 1..N-1 are started with the ``spawn`` method (a fresh interpreter: nothing of rank 0's threads or sessions is
inherited) and run ``target(rank, world_size, init_method, *args)``. A child dies with its parent
(:func:`guard_against_orphaning`: Linux's parent-death signal, and a watchdog thread elsewhere), and
:meth:`RankGroup.close` waits for the children, then terminates and kills what is left.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port free on the loopback interface now (the group's rendezvous)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def guard_against_orphaning() -> None:
    """Called first in a child: it is killed when its parent dies (``PR_SET_PDEATHSIG``), and a watchdog thread
    ends it if it finds itself re-parented (the signal does not exist outside Linux; and a parent that died before
    the call left no one to signal)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="ember-orphan-watchdog", daemon=True).start()


def _child_main(target: Callable[..., None], rank: int, world_size: int, init_method: str, args: tuple) -> None:
    guard_against_orphaning()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(levelname)s [rank {rank}] %(name)s: %(message)s")
    try:
        target(rank, world_size, init_method, *args)
    except BaseException:
        logging.getLogger(__name__).exception("tensor-parallel rank %d failed", rank)
        sys.stderr.flush()
        os._exit(1)


class RankGroup:
    """Ranks 1..N-1 as child processes (rank 0 is the caller); see the module docstring."""

    def __init__(self, processes: dict[int, Any], init_method: str):
        self.processes, self.init_method = processes, init_method

    @classmethod
    def start(cls, world_size: int, target: Callable[..., None], args: tuple = (),
              init_method: str | None = None) -> "RankGroup":
        init_method = init_method or f"tcp://127.0.0.1:{free_port()}"
        context = multiprocessing.get_context("spawn")
        processes = {}
        for rank in range(1, world_size):
            process = context.Process(target=_child_main, args=(target, rank, world_size, init_method, args),
                                      name=f"ember-rank-{rank}", daemon=False)
            process.start()
            processes[rank] = process
        return cls(processes, init_method)

    def failed_ranks(self) -> dict[int, str]:
        """Children that ended badly: rank -> its exit code or signal."""
        failed = {}
        for rank, process in self.processes.items():
            code = process.exitcode
            if code is None or code == 0:
                continue
            failed[rank] = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return failed

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait up to ``timeout_s`` for the children, then terminate and kill what is left; idempotent."""
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)

    def __enter__(self) -> "RankGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
