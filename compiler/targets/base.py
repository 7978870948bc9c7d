"""A compile target: which passes lower the high-level graph for an engine, and how its files are written."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from ember.graphs.nn.kv_cache import KVCacheStrategy

from ..compile_progress import CompileProgress, pass_name
from ..passes.base import Pass
from ..passes.inline_functions import inline_functions
from ..passes.lowering_record import refuse_unlowered

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Target:
    """One engine ember compiles for."""

    name: str
    description: str
    passes: tuple[Pass, ...]
    kv_strategies: tuple[KVCacheStrategy, ...]
    encodings: tuple[str, ...]
    write: Callable[[ir.Model, Path, Progress | None], list[Path]]
    # Passes that run after ``passes`` for one encoding (quantization), by encoding name.
    encoding_passes: dict[str, tuple[Pass, ...]] = field(default_factory=dict)
    # How the engine should load what this target writes: e.g. ``{"disabled_optimizers": [...]}`` for onnxruntime
    # (the manifest's ``"runtime"`` block's ``settings``, and ``"session"`` for older readers).
    session: dict[str, Any] = field(default_factory=dict)
    # The device kind its artifacts run on and the runtime backend that loads them (``ember.runtime.backends``
    # has one by this name): written to the manifest, so an artifact says what runs it.
    device_kind: str = "cpu"
    runtime: str = "onnxruntime-cpu"
    # The engine's execution providers, in order of preference (onnxruntime's names).
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Whether its lowered graphs still load as the branches of an ``If`` (the decode slots' graph,
    # ``compiler/slot_graph.py``): not where the engine's load-time fusions look a weight up in the node's own
    # graph, which in a branch holds none (onnxruntime's DequantizeLinear -> MatMulNBits fusion).
    loads_in_branches: bool = True

    def runtime_block(self) -> dict[str, Any]:
        """The manifest's ``"runtime"`` block: the backend, its device kind, and its load settings (providers and
        the target's session settings)."""
        return {"backend": self.runtime, "device_kind": self.device_kind,
                "settings": {"providers": list(self.providers), **self.session}}

    def passes_for(self, encoding: str) -> tuple[Pass, ...]:
        """Every pass a compile in ``encoding`` runs, in order."""
        if encoding not in self.encodings:
            raise ValueError(f"target {self.name} does not support encoding {encoding!r}; "
                             f"supported: {', '.join(self.encodings)}")
        return self.passes + self.encoding_passes.get(encoding, ())

    def lower(self, model: ir.Model, encoding: str = "float32", progress: CompileProgress | None = None) -> ir.Model:
        """Inline the blocks of a ``use_subgraphs`` graph, run the passes (each a stage of ``progress``), then refuse
        any custom op left unlowered."""
        model = inline_functions(model)
        for compiler_pass in self.passes_for(encoding):
            with progress.stage(f"lowering: {pass_name(compiler_pass)}") if progress else nullcontext():
                model = compiler_pass(model)
        refuse_unlowered(model, self.name)
        return model
