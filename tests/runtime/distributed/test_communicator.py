"""The communicator over real processes and gloo: each collective against its numpy reference
(graphs/ir/custom/collectives.py), its statistics, and a rank that hangs named within the timeout."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("torch.distributed", reason="tensor parallelism runs over torch.distributed (the test extra)")

from ember.graphs.ir.custom.collectives import all_gather_reference, all_reduce_reference  # noqa: E402
from ember.runtime.distributed import RankFailure, RankGroup, TorchDistributedCommunicator  # noqa: E402

SHAPE = (3, 5, 7)


def rank_input(rank: int, round_: int) -> np.ndarray:
    return np.random.default_rng(100 * round_ + rank).standard_normal(SHAPE).astype(np.float32)


def collectives(communicator, world: int) -> list[np.ndarray]:
    """What every rank does; returns its results (each checked against the references by the caller)."""
    results = []
    for round_, axis in enumerate((0, 1, -1)):
        mine = rank_input(communicator.rank, round_)
        summed = mine.copy()
        communicator.all_reduce(summed)
        results.append(summed)
        results.append(communicator.all_gather(mine, axis))
    return results


def expected(world: int) -> list[np.ndarray]:
    out = []
    for round_, axis in enumerate((0, 1, -1)):
        shards = [rank_input(r, round_) for r in range(world)]
        out += [all_reduce_reference(shards), all_gather_reference(shards, axis)]
    return out


def check_collectives(rank: int, world: int, init_method: str) -> None:
    """A child rank: the same collectives, its own results checked (a mismatch exits non-zero)."""
    communicator = TorchDistributedCommunicator(rank, world, init_method, timeout_s=20)
    try:
        for got, want in zip(collectives(communicator, world), expected(world)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    finally:
        communicator.close()


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_their_references(world):
    with RankGroup.start(world, check_collectives) as children:
        communicator = TorchDistributedCommunicator(0, world, children.init_method, timeout_s=20)
        try:
            results = collectives(communicator, world)
            for got, want in zip(results, expected(world)):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            assert communicator.stats.calls["all_reduce"] == 3 and communicator.stats.calls["all_gather"] == 3
            assert communicator.stats.bytes["all_reduce"] == 3 * np.prod(SHAPE) * 4
        finally:
            communicator.close()
        children.close()
        assert children.failed_ranks() == {}


def reduce_forever(rank: int, world: int, init_method: str) -> None:
    """A child rank that all-reduces until the group breaks."""
    communicator = TorchDistributedCommunicator(rank, world, init_method, timeout_s=5)
    while True:
        communicator.all_reduce(np.ones(4, np.float32))


def test_a_rank_that_hangs_is_named_within_the_timeout():
    with RankGroup.start(2, reduce_forever) as children:
        communicator = TorchDistributedCommunicator(0, 2, children.init_method, timeout_s=5)
        for _ in range(3):
            communicator.all_reduce(np.ones(4, np.float32))
        os.kill(children.processes[1].pid, signal.SIGSTOP)  # hung: alive, answering nothing
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1 of 2") as failure:
            while True:
                communicator.all_reduce(np.ones(4, np.float32))
        assert failure.value.rank == 1
        assert time.monotonic() - start < 15  # the 5 s timeout, then the heartbeats' age
        communicator.close()
    assert not any(p.is_alive() for p in children.processes.values())  # close() killed the stopped rank


def fail(rank: int, world: int, init_method: str) -> None:
    raise RuntimeError("this rank fails on purpose")


def test_a_rank_that_raises_is_reported_with_its_exit_code():
    children = RankGroup.start(2, fail)
    children.close(timeout_s=30)
    assert children.failed_ranks() == {1: "exit code 1"}


def reduce_half(rank: int, world: int, init_method: str) -> None:
    communicator = TorchDistributedCommunicator(rank, world, init_method, timeout_s=20)
    values = np.full(5, rank + 0.5, np.float16)
    communicator.all_reduce(values)
    communicator.close()


def test_half_precision_sums_as_its_reference():
    """A float16 rank graph (ort-cuda) all-reduces float16 activations."""
    with RankGroup.start(2, reduce_half) as children:
        communicator = TorchDistributedCommunicator(0, 2, children.init_method, timeout_s=20)
        values = np.full(5, 0.5, np.float16)
        communicator.all_reduce(values)
        communicator.close()
    assert values.dtype == np.float16
    assert np.array_equal(values, all_reduce_reference([np.full(5, 0.5, np.float16), np.full(5, 1.5, np.float16)]))
