"""Files the tool writes: modes that follow the umask, stale leftovers of killed runs, locks between processes."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# ``<anything>-<pid>-<random>`` names of this tool's temporary files and folders (staging, partial PNGs, backups)
_OWNER = re.compile(r"^\.[A-Za-z0-9_.+]*?-(\d+)-")


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an ``OSError``, or ``shutil.Error`` listing the copies that failed) says the disk is full."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def follow_umask(path: Path) -> None:
    """Give ``path`` (made by ``tempfile``, which makes it private) the mode a plain ``open``/``mkdir`` would: what
    the user's umask allows. Reading the umask means setting it; it is set straight back."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def remove_stale(parent: Path, pattern: re.Pattern[str] | None = None) -> None:
    """Delete the hidden temporary files and folders in ``parent`` whose owning process no longer runs (it was
    killed, so its own clean-up never ran). Names carry the owner's pid: ``.<what>-<pid>-<random>``."""
    import psutil

    if not parent.is_dir():
        return
    for stale in parent.iterdir():
        match = (pattern or _OWNER).match(stale.name)
        if match is None or psutil.pid_exists(int(match.group(1))):
            continue
        logger.info("deleting %s, left behind by a run that was killed", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(lock_file: Path, *, waiting_for: str) -> Iterator[None]:
    """Hold an inter-process lock on ``lock_file`` for the block (filelock: flock on POSIX, msvcrt on Windows), so two
    runs never build the same thing at once; a second run waits, saying for what."""
    from filelock import FileLock, Timeout

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another run that is %s", waiting_for)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
