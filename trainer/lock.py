"""An exclusive lock on a model directory, held by the chief for the whole run.

Two trainers writing one model directory interleave checkpoints and event files and both report success;
the lock makes the second one stop before it writes anything, with one line naming the holder.

How: ``<model_dir>/train.lock`` holds the holder's host, pid and start time (JSON) and is locked with
``flock``. The kernel drops a flock when its process dies, however it dies, so a lock file whose flock can
be taken was left by a dead process: it is taken over with a warning naming that process. While held, a
thread touches the file every ``HEARTBEAT_SECONDS``; the file is removed on release.

What it guarantees where:
- local disks (and several containers sharing one kernel): exact; a dead holder's lock is free at once.
- NFS: Linux maps flock to NFS byte-range locks (NLM for v3, the protocol itself for v4), which the server
  arbitrates between hosts, so exclusion holds across machines; a crashed client's lock is freed when its
  lease expires (v4: about 90 s). On a mount without server locks (``nolock``, ``local_lock=flock|all``)
  flock only excludes processes of one host; then a lock file written by another host counts as held while
  its heartbeat moves: an acquirer that gets the flock watches the heartbeat for ``STALE_SECONDS`` (unless it
  is already older than that) and takes over only if it stood still.
- object stores (``gs://``, ``s3://``; TensorFlow's file API has no exclusive create): no lock; a warning says
  so. Run one trainer per model directory there.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 30.0  # a heartbeat of another host that has not moved for this long is a dead holder's

_HELD_HERE: set[str] = set()  # model dirs locked by this process (POSIX locks on NFS do not exclude it)


class LockedError(ValueError):
    """The model directory is in use by another trainer; the message names it (host, pid, since when)."""


class ModelDirLock:
    """The lock of one model directory (see module docstring). ``acquire`` then ``release``; both idempotent.

    Args:
      model_dir: the model directory (must exist).
      heartbeat_seconds, stale_seconds: heartbeat period and how long another host's heartbeat must stand
        still before its lock counts as stale.
    """

    def __init__(self, model_dir: str, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 stale_seconds: float = STALE_SECONDS):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_FILE)
        self.heartbeat_seconds, self.stale_seconds = heartbeat_seconds, stale_seconds
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises LockedError naming the live holder."""
        if self._fd is not None:
            return
        if "://" in self.model_dir:
            log.warning("%s: no lock on an object store; make sure no other trainer uses this model dir",
                        self.model_dir)
            return
        key = os.path.realpath(self.model_dir)
        if key in _HELD_HERE:
            raise LockedError(f"{self.model_dir}: in use by another training run in this process")
        fd = self._lock_file()
        try:
            holder = _read_holder(fd)
            if holder:
                self._check_stale(holder, fd)
            _write_holder(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD_HERE.add(key)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="model-dir-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        """Removes the lock file and drops the lock."""
        if self._fd is None:
            return
        self._stop.set()
        self._heartbeat.join()
        try:
            os.remove(self.path)  # before the unlock: an acquirer waiting on this inode then sees it is gone
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        _HELD_HERE.discard(os.path.realpath(self.model_dir))

    def _lock_file(self) -> int:
        """Opens and flocks the lock file; retries when the file was replaced under us (a holder released)."""
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise LockedError(_in_use(self.model_dir, holder)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # we locked a file the holder removed on release: lock the new one
        raise LockedError(f"{self.path}: could not be locked (replaced 10 times in a row)")

    def _check_stale(self, holder: dict, fd: int) -> None:
        """We hold the flock over a lock file that names a holder: it died, unless it is on another host on a
        filesystem whose flocks do not reach us and its heartbeat still moves."""
        if holder.get("host") != socket.gethostname():
            beat = os.fstat(fd).st_mtime
            deadline = time.monotonic() + self.stale_seconds
            while time.time() - beat < self.stale_seconds and time.monotonic() < deadline:
                time.sleep(min(1.0, self.stale_seconds / 10))
                if os.fstat(fd).st_mtime != beat:
                    raise LockedError(_in_use(self.model_dir, holder) + " (its heartbeat moves)")
        log.warning("%s: taking over the lock of a trainer that is gone (%s)", self.model_dir, _describe(holder))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                os.utime(self.path)
            except OSError:  # the model dir went away: training fails on its own next write
                pass


def _read_holder(fd: int) -> dict:
    """The holder JSON of the lock file open as ``fd`` ({} when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        holder = json.loads(raw) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_holder(fd: int) -> None:
    raw = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                      "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, raw, 0)
    os.fsync(fd)


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"


def _in_use(model_dir: str, holder: dict) -> str:
    return (f"{model_dir}: in use by another trainer ({_describe(holder)}); wait for it to finish, stop it, "
            "or use another --model-dir")
