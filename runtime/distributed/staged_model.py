"""One tensor-parallel rank's model: its stage graphs run in order, the collectives between them through the
communicator (DESIGN.md: distribution).

The compiler cut the rank's graph at its collectives (``compiler/passes/cut_at_collectives.py``); this puts the
stages back together behind the one :class:`~ember.runtime.backends.LoadedModel` interface the decoder already
drives. A graph input is bound to every stage that reads it, a long-lived buffer (a KV cache layer's pool, the
logits) to the stage that reads or writes it; a value one stage makes and a later one reads (the carried values:
the residual stream, the rotary rows, the last token's index) stays where the stage wrote it, on the rank's device
(``LoadedModel.bind_output_on_device``): a host array on the CPU, a device buffer on a GPU, summed there by NCCL
and bound to the next stage by address, never copied to the host.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ember.compiler.passes.cut_at_collectives import Collective

from ..backends.base import LoadedModel, RuntimeBackend
from ..backends.cuda_memory import DeviceView
from .communicator import Communicator, Operand

if TYPE_CHECKING:
    from ember.compiler.artifact import Artifact


@runtime_checkable
class StageLoader(Protocol):
    """A backend that loads one model file of an artifact (the onnxruntime backends' ``load_file``)."""

    def load_file(self, path: Path) -> LoadedModel: ...


class StagedModel(LoadedModel):
    """A rank's stages and the collectives after each (see the module docstring)."""

    def __init__(self, backend: RuntimeBackend, stages: Sequence[tuple[LoadedModel, Sequence[Collective]]],
                 communicator: Communicator, graph_outputs: Sequence[str], load_seconds: float = 0.0):
        self.backend = backend
        self.stages = [(model, list(collectives)) for model, collectives in stages]
        self.communicator = communicator
        self.load_seconds = load_seconds
        made = {name for model, _ in self.stages for name in model.output_names}
        made |= {c.output for _, collectives in self.stages for c in collectives}
        self._carried_in = [[n for n in model.input_names if n in made] for model, _ in self.stages]
        wanted = set(graph_outputs)
        self._carried_out = [[n for n in model.output_names if n not in wanted] for model, _ in self.stages]
        self.input_names = list(dict.fromkeys(n for model, _ in self.stages for n in model.input_names if n not in made))
        self.output_names = [n for n in graph_outputs if any(n in model.output_names for model, _ in self.stages)]
        self.collective_seconds = 0.0  # time inside collectives since construction (the benchmark's figure)

    @classmethod
    def load(cls, artifact: "Artifact", rank: int, backend: RuntimeBackend,
             communicator: Communicator) -> "StagedModel":
        """Rank ``rank``'s stages of a verified artifact, each loaded by ``backend`` (which must be a
        :class:`StageLoader`: the onnxruntime backends are)."""
        if not isinstance(backend, StageLoader):
            raise TypeError(f"the {backend.name} backend cannot load a rank's stages (it has no load_file)")
        start = time.perf_counter()
        stages = [(backend.load_file(path), [Collective.from_json(c) for c in collectives])
                  for path, collectives in artifact.rank_stages(rank)]
        outputs = [value["name"] for value in artifact.manifest["graph"]["outputs"]]
        return cls(backend, stages, communicator, outputs, time.perf_counter() - start)

    # routing ------------------------------------------------------------------------------------------------
    def _readers(self, name: str) -> list[LoadedModel]:
        readers = [model for model, _ in self.stages if name in model.input_names]
        if not readers:
            raise KeyError(f"no stage of this rank's graph has an input {name!r}")
        return readers

    def _maker(self, name: str) -> LoadedModel:
        for model, _ in self.stages:
            if name in model.output_names:
                return model
        raise KeyError(f"no stage of this rank's graph makes an output {name!r}")

    def input_dtype(self, name: str) -> np.dtype:
        return self._readers(name)[0].input_dtype(name)

    def bind_input(self, name: str, array: np.ndarray) -> None:
        for model in self._readers(name):
            model.bind_input(name, array)

    def bind_buffer(self, name: str, view: Any, *, output: bool = False) -> None:
        if output:
            self._maker(name).bind_buffer(name, view, output=True)
        else:
            for model in self._readers(name):
                model.bind_buffer(name, view)

    def bind_output_to_host(self, name: str) -> None:
        self._maker(name).bind_output_to_host(name)

    def output(self, name: str) -> np.ndarray:
        return self._maker(name).output(name)

    # running ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Every stage in order; after each, its collectives (every rank runs the same ones, in the same order)."""
        values: dict[str, Operand] = {}
        for (model, collectives), carried_in, carried_out in zip(self.stages, self._carried_in, self._carried_out):
            for name in carried_in:
                value = values[name]
                if isinstance(value, DeviceView):
                    model.bind_buffer(name, value)
                else:
                    model.bind_input(name, value)
            for name in carried_out:  # rebound each run: an engine would reuse the last run's (shaped) output
                model.bind_output_on_device(name)
            model.run()
            for name in carried_out:
                values[name] = model.device_output(name)
            if collectives:
                start = time.perf_counter()
                for collective in collectives:
                    values[collective.output] = self._collect(collective, values[collective.input])
                self.collective_seconds += time.perf_counter() - start

    def _collect(self, collective: Collective, array: Operand) -> Operand:
        if isinstance(array, np.ndarray):
            array = np.ascontiguousarray(array)
        if collective.op == "AllReduce":
            self.communicator.all_reduce(array)
            return array
        if collective.op == "AllGather":
            if collective.axis is None:
                raise ValueError(f"the artifact's AllGather of {collective.input!r} names no axis")
            return self.communicator.all_gather(array, collective.axis)
        raise ValueError(f"unknown collective {collective.op!r} in the artifact")
