"""The checks every architecture makes of ``config.json``'s own content, before transformers fills in defaults."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def check_required_fields(data: Any, path: str | Path, required: tuple[str, ...]) -> None:
    """A JSON object whose ``architectures`` is a list of class names and which has every field in ``required``
    (a missing one would be filled with some other model's default by transformers)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    architectures = data.get("architectures")
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(a, str) for a in architectures)):
        raise ValueError(f"{path}: architectures must be a list of class names, not {architectures!r:.80}")
    missing = [name for name in required if data.get(name) is None]
    if missing:
        raise ValueError(f"{path}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
