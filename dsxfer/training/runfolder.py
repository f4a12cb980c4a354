"""One run per folder: an exclusive lock while a run writes it, and no clobbering of what is already there.

`hold(output_dir, ...)` is entered once per run (rank 0 does the work, every rank learns the outcome):
- the folder is created if needed; `.dsxfer.lock` is locked with flock(LOCK_EX | LOCK_NB) and names the
  holder (pid, host, start time). A second run on the same folder stops with one line naming the holder.
  The kernel releases the lock when a process dies, so the lock of a killed run is taken over (with a
  warning that names the dead holder); there is nothing to clean up by hand.
- `.dsxfer-run` marks a folder dsxfer made. A non-empty folder without it holds someone else's files and
  is refused unless `train.overwrite=true`. A dsxfer folder that holds an earlier run's checkpoints is
  refused for a fresh run (`train.resume=null`) unless `train.overwrite=true`, which deletes them first,
  so two runs never mix in one folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from dsxfer.errors import DsxferError

LOCK = ".dsxfer.lock"
MARKER = ".dsxfer-run"


class RunFolderError(DsxferError):
    """The run folder is in use, holds someone else's files, or cannot be written."""


_held: dict[Path, int | None] = {}  # folders this process holds -> lock descriptor (rank 0) or None


def output_error(path: Path, error: OSError, doing: str) -> RunFolderError:
    """One line for an OSError on the output path: which path, the cause, and what to do."""
    where = error.filename or path
    return RunFolderError(f"cannot {doing} {where}: {error.strerror or error}; check the disk (space, permissions, "
                          "read-only mount) or choose another train.output_dir")


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


def _acquire(folder: Path, log) -> int:
    lock = folder / LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(f"run folder {folder} is in use by {_describe(_holder(lock))}: wait for that run to end, "
                             "or choose another train.output_dir") from None
    previous = _holder(lock)
    if previous:  # a holder that released nothing: it died (a finished run clears the file)
        log(f"warning: taking over the lock of {folder} left by {_describe(previous)}, which no longer runs")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the descriptor releases the flock


def _mark(folder: Path) -> None:
    """Say that dsxfer made (or was allowed to take) this folder."""
    (folder / MARKER).write_text(json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S")}), encoding="utf-8")


def _check_contents(folder: Path, *, overwrite: bool, resume: str | None, log) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
    if not names:
        _mark(folder)
        return
    if MARKER not in names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if not overwrite:
            raise RunFolderError(f"train.output_dir={folder} already holds files dsxfer did not write ({shown}): "
                                 "choose a new or empty folder, or set train.overwrite=true to write into it anyway")
        log(f"warning: writing into {folder}, which holds files dsxfer did not write ({shown}); "
            "files with dsxfer's names are replaced (train.overwrite=true)")
        _mark(folder)
        return
    checkpoints = folder / "checkpoints"
    earlier = sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []
    if earlier and not resume:
        if not overwrite:
            raise RunFolderError(f"train.output_dir={folder} holds the checkpoints of an earlier run ({len(earlier)}): "
                                 "continue it with train.resume=auto, start over with train.overwrite=true "
                                 "(deletes them), or choose another train.output_dir")
        log(f"warning: deleting the {len(earlier)} checkpoint(s) of the earlier run in {checkpoints} (train.overwrite=true)")
        shutil.rmtree(checkpoints)


@contextlib.contextmanager
def hold(output_dir: str | Path, *, overwrite: bool = False, resume: str | None = None, log=print) -> Iterator[Path]:
    """Take the run folder for this run (every rank calls it; rank 0 locks and checks). Re-entrant in a process."""
    from dsxfer.training import engine as eng

    folder = Path(output_dir).expanduser().resolve()
    if folder in _held:
        yield folder
        return
    fd, error = None, None
    if eng.rank() == 0:
        try:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = _acquire(folder, log)
                _check_contents(folder, overwrite=overwrite, resume=resume, log=log)
            except OSError as e:
                raise output_error(folder, e, "write the run folder") from None
        except RunFolderError as e:
            error = e
            if fd is not None:
                _release(fd)
                fd = None
    message = eng.broadcast_text(str(error) if error else "")
    if message:
        raise error or RunFolderError(message)
    _held[folder] = fd
    try:
        yield folder
    finally:
        fd = _held.pop(folder, None)
        if fd is not None:
            _release(fd)
