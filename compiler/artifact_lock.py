"""Who may write an artifact directory, across processes: one lock per artifact, and the removal of what killed
writers leave behind.

Every writer of an artifact directory ``D`` holds ``D``'s lock for as long as it writes: :func:`write_artifact`
(building, publishing, replacing), the compile cache (check, compile and publish as one step, so concurrent first
runs compile once), ``ember models rm``. The lock is an OS file lock (``flock``, through the ``filelock`` library)
on the file ``.<D.name>.lock`` beside ``D``. The kernel drops it when its holder exits, ``kill -9`` included, so
a lock is never stale: no timeout, no PID file. Lock files are never deleted: deleting one that another process
is waiting on would let two holders in; an empty file per artifact is the price.

Temporary folders: ``D`` is built in ``.<D.name>.tmp-XXXXXXXX`` and a replaced ``D`` is moved aside to
``.<D.name>.old-XXXXXXXX`` before it is deleted, both beside ``D`` and only while ``D``'s lock is held. Hence the
rule of :func:`remove_stale_temps`: such a folder whose artifact's lock can be taken without waiting belongs to no
living process (its writer was killed) and is deleted; one whose lock is held is left alone, however old, so an
hour-long compile is never taken for a dead one. No age guess is needed.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

#: How long a writer waits for another's lock before saying that it waits (then it waits on, without limit).
WAIT_NOTICE_S = 2.0

#: The names of temporary folders (the suffix is ``tempfile.mkdtemp``'s: 8 of ``[a-z0-9_]``).
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[a-z0-9_]{8}$")


def lock_path(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.lock"


def acquire(directory: str | Path) -> FileLock:
    """``directory``'s lock, acquired: by this thread again if it holds it already (the lock counts), else after
    the process holding it lets go, saying so after :data:`WAIT_NOTICE_S`. Release it with ``.release()``.

    OSError when the lock file cannot be created: the parent folder is not writable."""
    directory = Path(directory)
    # One lock object per path in this process: a nested acquire (the compile cache holds the lock that
    # write_artifact takes again) counts up instead of waiting on itself.
    lock = FileLock(lock_path(directory), is_singleton=True)
    try:
        lock.acquire(timeout=WAIT_NOTICE_S)
    except Timeout:
        logger.warning("waiting for another process writing %s (it holds %s)", directory, lock.lock_file)
        lock.acquire()
    return lock


@contextmanager
def holding(directory: str | Path) -> Iterator[None]:
    """``with holding(D):`` the lock of :func:`acquire`, released on leaving."""
    lock = acquire(directory)
    try:
        yield
    finally:
        lock.release()


def new_temp_dir(directory: Path, kind: str = "tmp") -> Path:
    """An empty temporary folder beside ``directory`` (``kind``: ``tmp`` to build in, ``old`` to move aside);
    the caller holds ``directory``'s lock."""
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.{kind}-", dir=directory.parent))


def check_writable(directory: Path) -> None:
    """OSError unless the temporary folder that :func:`write_artifact` builds in can be made beside
    ``directory``: asked before a compile, not found out after it (a lock file that exists already can be taken
    in a folder that has since become read-only)."""
    new_temp_dir(directory).rmdir()


def move_aside(directory: Path) -> Path:
    """Rename ``directory`` (the caller holds its lock) into a new ``.old-`` folder beside it and return that
    folder, for the caller to delete once the name is taken again: the name is free at once, a process that has
    its files open keeps reading them (POSIX), and a kill midway leaves an ``.old-`` folder that
    :func:`remove_stale_temps` removes, never a half-deleted artifact under the real name."""
    aside = new_temp_dir(directory, "old")
    try:
        os.rename(directory, aside / directory.name)
    except BaseException:
        aside.rmdir()
        raise
    return aside


def publish(finished: Path, directory: Path) -> None:
    """Rename the ``finished`` folder to ``directory`` (the caller holds its lock). What was there is moved aside
    first and deleted after (:func:`move_aside`), or put back if the rename fails."""
    if not os.path.lexists(directory):
        os.replace(finished, directory)
        return
    aside = move_aside(directory)
    try:
        os.replace(finished, directory)
    except BaseException:
        os.rename(aside / directory.name, directory)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def discard(directory: Path) -> None:
    """Delete ``directory`` (the caller holds its lock), moved aside first (:func:`move_aside`)."""
    shutil.rmtree(move_aside(directory), ignore_errors=True)


def remove_stale_temps(parent: str | Path, held: str | None = None) -> list[Path]:
    """Delete the temporary folders in ``parent`` that no living process writes (the module docstring's rule) and
    return them: those of every artifact whose lock is free now (tried without waiting, so a writer at work is
    never delayed), and those of artifact ``held``, whose lock the caller holds (so no one else writes it)."""
    removed: list[Path] = []
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        if match["name"] == held:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            probe = FileLock(lock_path(entry.parent / match["name"]))  # a new descriptor: held by anyone = busy
            try:
                probe.acquire(timeout=0)
            except (Timeout, OSError):
                continue
            try:
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                probe.release()
        logger.info("removed %s, left by a writer that was killed", entry)
        removed.append(entry)
    return removed
