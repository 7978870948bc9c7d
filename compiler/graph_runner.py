"""What the compiler needs to run a graph it is compiling (KV cache calibration), as a protocol.

The compiler sits below the runtime and never imports it; the caller that compiles (the runtime's compile cache,
``ember compile``) passes a runtime backend, which implements this (``RuntimeBackend.run_graph``), down.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class GraphRunner(Protocol):
    def run_graph(self, model_path: Path, inputs: dict[str, np.ndarray],
                  in_place: dict[str, tuple[str, np.ndarray]]) -> None:
        """Run the saved model on host ``inputs``; each ``in_place`` input is bound with its ``(output, array)``
        to the same host array, updated in place; other outputs are discarded."""
