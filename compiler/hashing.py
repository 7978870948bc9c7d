"""sha256 of files, remembered by (size, mtime) so that an unchanged multi-GB file is hashed once."""
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


class HashMemo:
    """A json file of ``path -> [size, mtime_ns, sha256]``; a changed size or mtime means hash again."""

    def __init__(self, memo_file: str | Path):
        self.memo_file = Path(memo_file)
        try:
            self._entries = json.loads(self.memo_file.read_text())
        except (OSError, ValueError):
            self._entries = {}

    def sha256(self, path: str | Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        entry = self._entries.get(str(path))
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        digest = sha256_file(path)
        self._entries[str(path)] = [stat.st_size, stat.st_mtime_ns, digest]
        self._save()
        return digest

    def record(self, path: str | Path, digest: str) -> None:
        """Remember a digest computed elsewhere (a file just written and hashed under another name)."""
        path = Path(path).resolve()
        stat = path.stat()
        self._entries[str(path)] = [stat.st_size, stat.st_mtime_ns, digest]
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
