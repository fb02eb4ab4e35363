"""An exclusive, non-blocking lock on an open file, held until it is released or the file is closed.

On Linux and macOS it is ``fcntl.flock``, which belongs to the open file description: two opens of
one file conflict also inside one process, a forked child shares its parent's lock, and the lock
ends when the process does. On Windows it is ``msvcrt.locking`` of one byte far past any log's end
(Windows locks are mandatory, so locking the content would stop readers). Where neither works (a
file system without locks, another platform) only this process's own opens are kept apart, and a
warning says so.
"""

from __future__ import annotations

import errno
import os
import threading
import warnings
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # not Windows
    msvcrt = None  # type: ignore[assignment]

from ..utils import user_stacklevel

# errors of a lock request that mean "someone else holds it", and those that mean "no locks here"
_HELD_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}
_UNSUPPORTED_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOSYS", -1)}
# the byte Windows locks: far past any log's end, and within the 32-bit offsets msvcrt takes
_WINDOWS_LOCK_OFFSET = 2**31 - 2

# files this process holds, by (device, inode), with the holding process's id (a forked child
# inherits this table but not the ownership)
_held: dict[tuple[int, int], int] = {}
_held_guard = threading.Lock()


class FileInUse(Exception):
    """The file is locked by someone else; ``in_this_process`` tells whether by this process."""

    def __init__(self, in_this_process: bool) -> None:
        super().__init__("in this process" if in_this_process else "by another process")
        self.in_this_process = in_this_process


def file_key(fd: int) -> tuple[int, int]:
    """(device, inode) of an open file: what identifies it whatever path or link it was opened by."""
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def acquire(fd: int, name: str) -> tuple[int, int]:
    """Lock the open file ``fd`` exclusively, without waiting; returns its key for :func:`release`.

    Raises:
        FileInUse: another open of this file (in this process or another) holds the lock.
    """
    key = file_key(fd)
    with _held_guard:
        if _held.get(key) == os.getpid():
            raise FileInUse(in_this_process=True)
        if not _os_lock(fd, name):
            raise FileInUse(in_this_process=False)
        _held[key] = os.getpid()
    return key


def release(fd: int, key: Optional[tuple[int, int]]) -> None:
    """Unlock ``fd`` (it stays open). Explicit, because a child forked meanwhile shares the lock and
    would otherwise keep it after the owner closed its descriptor."""
    with _held_guard:
        if key is not None and _held.get(key) == os.getpid():
            del _held[key]
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        elif msvcrt is not None:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass  # closing the descriptor releases it anyway


def _os_lock(fd: int, name: str) -> bool:
    """True when locked (or when the platform cannot lock, after a warning), False when held elsewhere."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        if msvcrt is not None:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        reason = "this platform has neither fcntl.flock nor msvcrt.locking"
    except OSError as exc:
        if msvcrt is not None or exc.errno in _HELD_ERRNOS:
            return False
        if exc.errno not in _UNSUPPORTED_ERRNOS:
            raise
        reason = f"its file system does not support locks ({exc.strerror})"
    warnings.warn(
        f"Cannot lock {name!r}: {reason}. Only writers in this process are kept apart; make sure no other "
        f"process writes this file at the same time.",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
    return True
