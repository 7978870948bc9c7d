"""Stop strings (OpenAI's ``stop``): the text ends where one first appears, and it is not part of the output.

A stop string can span several tokens, so text that might be the beginning of one is held back until it can no
longer match: a streamed client never receives text that a later token turns into (part of) a stop string.
"""
from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feeds text deltas in, lets through what cannot be (the start of) a stop string."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("a stop string cannot be empty")
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of the text so far that is safe to emit. After a stop string has appeared, the text before
        it is returned, :attr:`stopped` is True and later text is dropped."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        pending = self._pending + text
        found = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self._pending = ""
            return pending[:min(found)]
        keep = self._held_back(pending)
        self._pending = pending[len(pending) - keep:]
        return pending[:len(pending) - keep]

    def flush(self) -> str:
        """What is held back, at the end of the generation (no later text can complete a stop string)."""
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    def _held_back(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins some stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
