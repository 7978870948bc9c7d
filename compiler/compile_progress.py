"""Progress of one compile, stage by stage: reading the checkpoint into the graph, each lowering pass, the KV
cache calibration, writing the files. A compile of a large model takes minutes, most of it before a byte is
written; without this only the writing bar moved (issue 17). One bar counts the stages (its description names
the current one, tqdm shows the elapsed time); each stage's duration is logged at DEBUG, so ``-v`` tells where a
slow compile spends its time."""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def pass_name(compiler_pass: Callable) -> str:
    """A pass's name for people: its function's name (through ``functools.partial``)."""
    while isinstance(compiler_pass, functools.partial):
        compiler_pass = compiler_pass.func
    return getattr(compiler_pass, "__name__", type(compiler_pass).__name__)


class CompileProgress:
    """Counts a compile's stages; ``total`` is known up front (the target's pass list is data), so the bar's
    percentage is honest. ``stages`` keeps (name, seconds) of every finished stage, in order."""

    def __init__(self, total: int, description: str = "compiling") -> None:
        self.total = total
        self.stages: list[tuple[str, float]] = []
        self._bar = tqdm(total=total, desc=description, unit="stage", disable=None, leave=False)
        self._description = description

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._bar.set_description_str(f"{self._description}: {name}")
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.stages.append((name, seconds))
        logger.debug("compile stage %s: %.2f s", name, seconds)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "CompileProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
