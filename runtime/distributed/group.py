"""A tensor-parallel group's life: start the ranks, hand them the artifact, step them, stop them.

Rank 0 is the process that runs the pipeline. The other ranks are either its children (``PipelineConfig(
tensor_parallel=N)`` on one machine: :class:`~.launcher.RankGroup` spawns them) or processes ``torchrun`` started on
this and other hosts (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` in the environment: every rank runs the same
``ember`` command and the ranks above 0 turn into followers, :func:`serve_from_environment`).

Two channels join the ranks: the communicator (``.communicator``) for the collectives inside a step, whose timeout
(30 s) bounds how long a dead or hung rank can stall the others (gloo on the host; NCCL on device buffers too, for a
GPU artifact: :func:`open_device_collectives`); and the step channel here, over gloo, on which the followers wait for
rank 0's next step for as long as the server idles (its own process group, without that timeout; rank 0's death
still closes its connections at once).
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..backends import RuntimeBackend, backend_for
from .communicator import Communicator, RankFailure, TorchDistributedCommunicator, torch_distributed
from .launcher import RankGroup, guard_against_orphaning
from .mirror import Follower, MirroredBackend, MirroredModel, StepMessage
from .staged_model import StagedModel

if TYPE_CHECKING:
    from ember.compiler.artifact import Artifact

logger = logging.getLogger(__name__)

#: How long a collective inside a step may wait for the other ranks before they are declared failed.
COLLECTIVE_TIMEOUT_S = 30.0
#: How long a follower waits for rank 0's next step (a server may idle for days).
_IDLE_TIMEOUT = timedelta(days=365)


def open_device_collectives(artifact: "Artifact", communicator: Communicator, device_index: int) -> None:
    """The NCCL group, when the artifact's collectives run on device buffers (manifest ``tensor_parallel``:
    ``collectives_on`` "device"); every rank calls this right after the artifact is known, so the groups are made in
    the same order everywhere."""
    block = artifact.manifest.get("tensor_parallel", {})
    if block.get("collectives_on", "host") == "device":
        communicator.open_device_group(str(block["backend"]), device_index)


def torchrun_environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, ranks on this host)`` when torchrun (or another launcher setting its variables) started
    this process; None otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


class StepChannel:
    """Rank 0's steps to the followers: one broadcast of a pickled :class:`StepMessage` per model run."""

    def __init__(self) -> None:
        self._dist = torch_distributed()[1]
        self.group = self._dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)

    def send(self, message: Any) -> None:
        self._dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> Any:
        box = [None]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)


class TensorParallelGroup:
    """Rank 0's handle on the group: the communicator, the step channel and (single host) the child ranks.
    :meth:`close` stops the followers and, failing that within a bound, kills them; it runs when the model is
    collected or at exit."""

    def __init__(self, communicator: Communicator, channel: StepChannel, children: RankGroup | None):
        self.communicator, self.channel, self.children = communicator, channel, children
        self.failed: RankFailure | None = None
        self.closed = False

    def send(self, message: StepMessage) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            self.channel.send(message)
        except RankFailure as error:
            self.failed = error
            raise
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses of many kinds
            self.failed = RankFailure(self._who_failed(error))
            raise self.failed from error

    def run_failed(self, error: BaseException) -> None:
        """A step failed on rank 0 (a collective raised): the group is not stepped again, only stopped."""
        self.failed = error if isinstance(error, RankFailure) else RankFailure(self._who_failed(error))

    def _who_failed(self, error: BaseException) -> str:
        """The failure's message, naming the rank: a child that exited (waited for a few seconds: a killed child is
        reaped a moment after its connections close), else one whose heartbeat stopped."""
        deadline = time.monotonic() + 3.0
        while self.children is not None and time.monotonic() < deadline:
            dead = self.children.failed_ranks()
            if dead:
                rank, how = next(iter(dead.items()))
                return f"tensor-parallel rank {rank} failed ({how}): {error}"
            time.sleep(0.1)
        silent = self.communicator.silent_ranks()
        if silent:
            return f"tensor-parallel rank {silent[0]} stopped answering: {error}"
        return f"a tensor-parallel rank did not take the next step: {error}"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.failed is None:
            try:
                self.channel.send(StepMessage(run=False))
            except Exception as error:  # noqa: BLE001 - stopping anyway
                logger.debug("could not tell the followers to stop: %s", error)
        try:
            self.communicator.close()
        finally:
            if self.children is not None:
                self.children.close()


def load_tensor_parallel(artifact: "Artifact", backend: RuntimeBackend, num_threads: int,
                         timeout_s: float = COLLECTIVE_TIMEOUT_S) -> MirroredModel:
    """Rank 0's model of a tensor-parallel artifact: the other ranks started (or found, under torchrun), told the
    artifact, loaded; returns the mirrored model the decoder drives (``mirror.py``)."""
    world = artifact.world_size
    environment = torchrun_environment()
    children = None
    if environment is not None:
        rank, env_world, on_host = environment
        if rank != 0 or env_world != world:
            raise ValueError(f"this process is rank {rank} of {env_world} (torchrun); {artifact.path} is split over "
                             f"{world} ranks, and only rank 0 loads it (the others follow)")
        communicator: Communicator = TorchDistributedCommunicator.from_environment(timeout_s=timeout_s)
    else:
        on_host = world
        children = RankGroup.start(world, serve_rank, (timeout_s,))
        try:
            communicator = TorchDistributedCommunicator(0, world, children.init_method, timeout_s=timeout_s)
        except BaseException:
            children.close()
            raise
    group = TensorParallelGroup(communicator, StepChannel(), children)
    try:
        threads = max(1, num_threads // on_host)
        group.channel.send({"artifact": str(artifact.path), "manifest_sha256": artifact.manifest.get("manifest_sha256"),
                            "threads": threads})
        open_device_collectives(artifact, communicator, backend.device_index)
        local_backend = backend_for(artifact.manifest, threads, device_index=backend.device_index)
        staged = StagedModel.load(artifact, 0, local_backend, communicator)
        group.channel.barrier()  # every rank has loaded: the first step's collectives wait for no load
    except BaseException:
        group.failed = RankFailure("starting the tensor-parallel ranks failed")
        group.close()
        raise
    model = MirroredModel(staged, MirroredBackend(local_backend, on_host), group)
    weakref.finalize(model, group.close)
    logger.info("tensor parallel: %d ranks (%d on this host), %d threads each, %d stages per rank", world, on_host,
                threads, len(staged.stages))
    return model


def serve_rank(rank: int, world_size: int, init_method: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """A child rank's life (``RankGroup``'s target): join the group and follow rank 0 until it stops."""
    guard_against_orphaning()
    follow(TorchDistributedCommunicator(rank, world_size, init_method, timeout_s=timeout_s))


def serve_from_environment(timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """A rank above 0 started by torchrun: join the group its environment names and follow rank 0."""
    follow(TorchDistributedCommunicator.from_environment(timeout_s=timeout_s))


def follow(communicator: Communicator) -> None:
    """Load this rank's part of the artifact rank 0 names, then replay rank 0's steps until it says stop."""
    from ember.compiler.artifact import verify_artifact

    channel = StepChannel()
    try:
        hello = channel.receive()
        artifact = verify_artifact(hello["artifact"])
        if artifact.manifest.get("manifest_sha256") != hello["manifest_sha256"]:
            raise ValueError(f"rank {communicator.rank}: {hello['artifact']} is not the artifact rank 0 loaded (its "
                             f"manifest differs); every host needs the same artifact at the same path")
        # one device per rank on a host: cuda:<local rank> (ignored on the CPU)
        device = int(os.environ.get("LOCAL_RANK", communicator.rank))
        open_device_collectives(artifact, communicator, device)
        backend = backend_for(artifact.manifest, int(hello["threads"]), device_index=device)
        model = StagedModel.load(artifact, communicator.rank, backend, communicator)
        channel.barrier()
        follower = Follower(backend, model)
        while True:
            message = channel.receive()
            if not message.run:
                break
            follower.apply(message)
    finally:
        communicator.close()
