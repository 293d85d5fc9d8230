"""The workdir of a run: an exclusive lock on it, and metrics that never repeat a step.

`WorkdirLock` is held by process 0 of a run for its whole length: `workdir/lock` is locked with
`flock` (the kernel drops the lock when its process dies, however it dies) and holds the holder's
host and pid, so a second run into the same workdir refuses at once naming the first. A lock file
whose lock is free but whose content is not empty was left by a run that died without releasing
it: it is taken over, with a message naming that run.
"""

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import time
from collections.abc import Callable

from vig_jax.train.errors import UserError


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on host {holder['host']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return f"unreadable lock content {text[:80]!r}"


class WorkdirLock(contextlib.AbstractContextManager):
    """`with WorkdirLock(workdir, log):` holds `workdir/lock` (creating `workdir` if needed).

    Args:
      workdir: the run's directory.
      log: called with one line when a stale lock is taken over (or locks are unsupported).
    Raises (on entering):
      UserError: another live run holds the lock (named), or the workdir is not writable.
    """

    def __init__(self, workdir: str | pathlib.Path, log: Callable[[str], None]):
        self.path = pathlib.Path(workdir).absolute() / "lock"
        self._log = log
        self._fd: int | None = None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"cannot write to workdir {self.path.parent}: {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise UserError(
                f"workdir {self.path.parent} is in use by another run ({holder}); stop it or "
                "choose another --workdir"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            self._log(f"warning: {self.path} cannot be locked on this filesystem ({e.strerror})")
        self._fd = fd  # from here on, release() empties the file
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            self._log(
                f"taking over the lock of a run that ended without releasing it "
                f"({_describe_holder(previous)}; that process is gone)"
            )
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self) -> None:
        """Releases the lock (idempotent)."""
        if self._fd is not None:
            # Emptied, not deleted: a run waiting to open the same inode must not lock a file
            # that a third run then re-creates. Empty means released cleanly.
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the flock
            self._fd = None


def truncate_metrics(workdir: str | pathlib.Path, step: int) -> int:
    """Drops the lines of `workdir/metrics.jsonl` after `step` (and any torn last line).

    A resumed run logs the steps after its checkpoint again; without this they would appear twice.
    Returns the number of lines dropped.
    """
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False  # torn by a kill mid-write
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped
