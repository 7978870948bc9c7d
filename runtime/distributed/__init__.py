"""Tensor-parallel ranks at run time (DESIGN.md: distribution): the communicator (torch.distributed), the rank
processes, each rank's stage runner, and rank 0 driving the others. Needs torch (``pip install 'ember[distributed]'``),
imported only when a tensor-parallel artifact is loaded."""
from .communicator import CollectiveStats, Communicator, RankFailure, TorchDistributedCommunicator
from .launcher import RankGroup, free_port, guard_against_orphaning

__all__ = ["CollectiveStats", "Communicator", "RankFailure", "RankGroup", "TorchDistributedCommunicator",
           "free_port", "guard_against_orphaning"]
