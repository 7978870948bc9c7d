"""sha256 of files, remembered by their inode's identity and change time so that an unchanged multi-GB file is
hashed once.

What identifies "the same bytes as when hashed" (POSIX): the file's device and inode, its size, its mtime and its
**ctime**. mtime alone is not enough: ``os.utime`` (and ``touch -r``, ``cp -p``, ``rsync -t``, ``tar x``) sets it
to any value, so bytes changed with the mtime restored would pass. ctime cannot be set from user space: the kernel
moves it to "now" on every write, truncate, rename-over, chmod and ``utime`` itself, so a file whose ctime is the
one recorded has not been touched since. The inode catches a file replaced by another (a copy, a rename over it)
whose times happen to match. A changed key only costs a re-hash, so the key errs on that side (a chmod re-hashes).

The limit: timestamps have the kernel clock's granularity (a few ms on Linux), so a change made within the same
tick as the recording, with the mtime restored, is not seen. Hashing compares the file's stat before and after
reading it and does not remember a file that changed while it was read. The memo is a cache against accident and
restored timestamps, not a signature: whoever can write the memo file can also forge it.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_CHUNK = 16 << 20
_LOCK = threading.Lock()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stat_key(stat: os.stat_result) -> list[int]:
    """What must not change for a remembered digest to hold (see the module docstring for why each part)."""
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class HashMemo:
    """A json file of ``path -> [stat_key..., sha256]``; a file whose :func:`stat_key` changed is hashed again.

    Entries in an older form (``[size, mtime_ns, sha256]``) never match, so a memo written by an earlier ember is
    re-hashed once, never trusted."""

    def __init__(self, memo_file: str | Path):
        self.memo_file = Path(memo_file)
        try:
            self._entries = json.loads(self.memo_file.read_text())
        except (OSError, ValueError):
            self._entries = {}
        if not isinstance(self._entries, dict):
            self._entries = {}

    def sha256(self, path: str | Path) -> str:
        path = Path(path).resolve()
        key = stat_key(path.stat())
        entry = self._entries.get(str(path))
        if isinstance(entry, list) and entry[:-1] == key:
            return entry[-1]
        digest = sha256_file(path)
        if stat_key(path.stat()) == key:  # a file written while it was read is hashed again next time
            self._remember(path, key, digest)
        return digest

    def record(self, path: str | Path, digest: str) -> None:
        """Remember a digest computed elsewhere (a file just written and hashed under another name)."""
        path = Path(path).resolve()
        self._remember(path, stat_key(path.stat()), digest)

    def _remember(self, path: Path, key: list[int], digest: str) -> None:
        self._entries[str(path)] = [*key, digest]
        self._save()

    def _save(self) -> None:
        with _LOCK:
            try:
                self.memo_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.memo_file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._entries))
                os.replace(tmp, self.memo_file)
            except OSError:
                pass  # a memo we cannot write only costs a re-hash next time
