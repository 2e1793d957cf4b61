"""One run per output folder at a time.

Two ``actpatch run`` s on one folder would write into each other's unit folders (one removes a
finished target's ``units/`` while the other still writes there). :func:`output_lock` takes an
exclusive lock on ``out/.actpatch.lock`` for the whole run: the operating system drops it when
the holding process ends, however it ends, so the lock of a killed run is simply taken over by
the next one. The file records the holder's pid and start time, which the refusal names.
"""

from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputDirError

__all__ = ["output_lock", "LOCK_NAME"]

LOCK_NAME = ".actpatch.lock"


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold the folder's lock while the block runs; refuse with :class:`OutputDirError` naming
    the holder when another live process has it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputDirError(f"Output directory {str(out)!r} is not writable ({e.strerror}); "
                             f"choose another with --out.") from None
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise OutputDirError(f"{out} is in use by another actpatch run ({holder}); wait for it to end, or "
                                 f"use another --out directory.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {dt.datetime.now().isoformat(timespec='seconds')}".encode(), 0)
        yield out / LOCK_NAME
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: msvcrt locks a byte range instead
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
