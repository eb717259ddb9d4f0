"""One writer per output: an exclusive lock file inside the output folder.

``with output_lock(folder, "training"):`` creates ``folder/.cellgap.lock`` with ``O_CREAT | O_EXCL`` (atomic on
local and NFSv3+ file systems) holding the owner's pid, host, command and start time. A second run on the same
folder stops at once with :class:`OutputLockedError` naming the other run. A lock left by a process that no
longer runs on this host is taken over with a message; a lock from another host is never taken over (its
process cannot be checked from here): the message says how to remove it.

The standard library has ``fcntl.flock``, but it is released silently when the holder dies and it does not say
who holds the lock, and on NFS it is emulated unreliably; a lock file the user can read answers "who?".
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".cellgap.lock"
_held: dict[Path, int] = {}  # locks this process holds → nesting depth (a study run locks, its training locks again)
logger = logging.getLogger(__name__)


class OutputLockedError(RuntimeError):
    """Another live run writes to this output."""


def _owner(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_lock(folder: str | os.PathLike) -> dict | None:
    """The owner recorded in ``folder``'s lock, ``{}`` for an unreadable lock file, None when unlocked."""
    path = Path(folder) / LOCK_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) else {}
    except ValueError:
        return {}  # a writer killed between create and write: no owner to check


def lock_is_live(owner: dict | None) -> bool:
    """Whether a recorded owner may still be running (another host's owner is assumed alive)."""
    if owner is None:
        return False
    if not owner or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("host") != socket.gethostname():
        return True
    return _alive(owner["pid"])


def _describe(owner: dict) -> str:
    return (f"{owner.get('what', 'a run')} (pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
            f"{owner.get('command', '?')})")


def acquire(folder: str | os.PathLike, what: str) -> Path:
    """Take ``folder``'s lock (creating the folder) or raise :class:`OutputLockedError`; returns the lock path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_NAME).resolve()
    if path in _held:
        _held[path] += 1
        return path
    for _ in range(3):  # a stale lock removed by us may be recreated by another run in between
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_lock(folder)
            if owner is None:
                continue  # released meanwhile
            if lock_is_live(owner):
                host = owner.get("host")
                fix = ("wait for it to finish or stop it" if host == socket.gethostname() else
                       f"if that run is over, delete {path}")
                raise OutputLockedError(f"{folder}: in use by {_describe(owner)}; {fix}, or choose another output") from None
            logger.warning(f"{folder}: taking over the lock of a run that is no longer running ({_describe(owner) if owner else 'no owner recorded'})")
            print(f"{folder}: taking over a stale lock (its run is no longer running)", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_owner(what), f)
            f.flush()
            os.fsync(f.fileno())
        _held[path] = 1
        return path
    raise OutputLockedError(f"{folder}: could not take the lock {path}; another run keeps taking it")


def release(folder: str | os.PathLike) -> None:
    """Release this process's hold on ``folder``'s lock; the file goes with the outermost hold."""
    path = (Path(folder) / LOCK_NAME).resolve()
    if path not in _held:
        return
    _held[path] -= 1
    if _held[path] == 0:
        del _held[path]
        owner = read_lock(folder)
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            path.unlink(missing_ok=True)


@contextmanager
def output_lock(folder: str | os.PathLike, what: str):
    """Hold ``folder``'s exclusive lock for the block (see the module docstring)."""
    path = acquire(folder, what)
    try:
        yield path
    finally:
        release(folder)


class OutputLock:
    """Ignite handler: ``folder``'s lock held from the engine's construction to its end (an evaluation's or an
    inference's output folder; on rank 0 only under torch.distributed)."""

    def __init__(self, folder: str | os.PathLike, what: str = "a run") -> None:
        self.folder = Path(folder)
        self.what = what
        self.held = False

    def attach(self, engine) -> None:
        import torch.distributed as dist
        from ignite.engine import Events

        if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
            return
        acquire(self.folder, self.what)
        self.held = True
        engine.add_event_handler(Events.COMPLETED, self.release)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def release(self, engine=None) -> None:
        if self.held:
            self.held = False
            release(self.folder)

    def exception_raised(self, engine, error: BaseException) -> None:
        self.release()
        raise error  # ignite swallows an exception that a handler of this event does not raise again
