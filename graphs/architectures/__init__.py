"""ember's architecture families, one folder each, each exporting one ``SPEC`` (see :mod:`.spec`).

:data:`SPECS` is the static table of the built-in ones; :func:`spec_for` and :func:`spec_for_gguf` find the one
that builds a Hugging Face class or a GGUF file's ``general.architecture``. The runtime's registry points each
of its entries at one of these specs; nothing here knows about pipelines or tasks.
"""
from __future__ import annotations

from .bert import SPEC as BERT
from .gemma2 import SPEC as GEMMA2
from .llama import SPEC as LLAMA
from .phi3 import SPEC as PHI3
from .qwen3 import SPEC as QWEN3
from .spec import ArchitectureSpec

SPECS: tuple[ArchitectureSpec, ...] = (LLAMA, QWEN3, GEMMA2, PHI3, BERT)


def spec_for(hf_architecture: str | None, specs: tuple[ArchitectureSpec, ...] = SPECS) -> ArchitectureSpec | None:
    """The spec that builds a Hugging Face class (``config.json``'s ``architectures[0]``), or None."""
    return next((s for s in specs if hf_architecture in s.hf_architectures), None)


def spec_for_gguf(gguf_architecture: str | None,
                  specs: tuple[ArchitectureSpec, ...] = SPECS) -> ArchitectureSpec | None:
    """The spec that reads GGUF files of ``general.architecture``, or None."""
    return next((s for s in specs if gguf_architecture in s.gguf_architectures), None)


def gguf_architectures(specs: tuple[ArchitectureSpec, ...] = SPECS) -> dict[str, str]:
    """Every supported GGUF ``general.architecture`` -> the Hugging Face class it is read as."""
    return {gguf: hf for s in specs for gguf, hf in s.gguf_architectures.items()}


__all__ = ["ArchitectureSpec", "BERT", "GEMMA2", "LLAMA", "PHI3", "QWEN3", "SPECS", "gguf_architectures", "spec_for",
           "spec_for_gguf"]
