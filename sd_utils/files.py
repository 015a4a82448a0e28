"""Files the tool writes: modes that follow the umask, stale leftovers of killed runs, locks between processes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# weight files are identified by name, size and time (see folder_digest), configs by content
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".data")
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


def folder_digest(root: Path) -> str:
    """A digest of a diffusers folder's configs (by content) and weight files (by name, size and modification time).

    Weights are not read: hashing SDXL's 7-14 GB on every run would cost more than the run's start. A rewritten
    weight file changes its size or time, and so the digest."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = path.relative_to(root).as_posix()
        if path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            digest.update(f"{relative}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        elif path.suffix in (".json", ".txt"):
            digest.update(f"{relative}:".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


_BACKUP = re.compile(r"^\..+\.old-(\d+)-$")  # .<folder>.old-<pid>-


def replace_folder(new: Path, destination: Path) -> None:
    """Move ``new`` to ``destination``; an existing ``destination`` is removed only once ``new`` is in place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(destination.parent, _BACKUP)  # of runs killed between the two renames
    backup = None
    if destination.exists():
        backup = destination.with_name(f".{destination.name}.old-{os.getpid()}-")
        destination.rename(backup)
    try:
        new.rename(destination)
    except OSError:
        if backup is not None:
            backup.rename(destination)
        raise
    if backup is not None:
        shutil.rmtree(backup)
