"""Whether a run is running, finished or crashed, told from facts rather than from its log alone.

While a search (start or resume) runs, its driver holds an exclusive flock on
RUN_DIR/run.lock (whose content says who holds it) and rewrites RUN_DIR/heartbeat.json
every INTERVAL_S. The kernel drops a flock when its process dies, however it dies
(kill -9, the OOM killer), so a free lock on an unfinished run means it crashed; a power
loss drops it too, with the machine. Where flock does not work the heartbeat's age decides.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..io.writer import atomic_write_text
from .rundir import RunDir

LOCK = "run.lock"
HEARTBEAT = "heartbeat.json"
INTERVAL_S = 10.0
STALE_S = 3 * INTERVAL_S  # three missed beats: the driver is gone, not merely busy
ACQUIRE_WAIT_S = 2.0  # `evomerge runs` takes the lock shared for an instant to test it; a starting driver outwaits that
BUSY = {errno.EWOULDBLOCK, errno.EAGAIN}  # the one errno on Linux, two names elsewhere
HOST = socket.gethostname()


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[None]:
    """RUN_DIR is running for the length of the block: its lock is held and its heartbeat beats.
    Raises UserError, before the block, while another process runs it."""
    path = Path(run_dir)
    # os.open's descriptor is not inherited by exec'd children (Ray, mergekit): only this
    # process's death frees the lock. A bare fork (multiprocessing's "fork") would share it.
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _acquire(fd, path)
        if _beating_elsewhere(path, locked):
            raise UserError(_refusal(path, HEARTBEAT))
        if locked:
            _write_owner(fd)
        beat = _Heartbeat(path)
        beat.start()
        try:
            yield
        finally:
            beat.stop()
    finally:
        os.close(fd)  # frees the flock


def state(run_dir: str | Path) -> str:
    """running, finished, stopped early (patience or wall time; finished too), or crashed
    (no process runs it and it did not finish: `evomerge resume` continues it)."""
    path = Path(run_dir)
    lock = _probe(path)
    if lock == "held" or _beating_elsewhere(path, lock == "free"):
        return "running"
    session = _last_session(path)
    if _ended(path, session):
        return "stopped early" if "stopped after generation" in session else "finished"
    return "crashed"


def heartbeat_age(run_dir: str | Path) -> float | None:
    """Seconds since the driver's last heartbeat; None for a run that never had one."""
    beat = _read_json(Path(run_dir) / HEARTBEAT)
    return time.time() - beat["time"] if beat and "time" in beat else None


def _acquire(fd: int, path: Path) -> bool:
    """True once the flock is ours; False where flock does not work (ENOLCK on an NFS mount
    without a lock daemon, ENOTSUP/EINVAL on some FUSE filesystems): the heartbeat stands in."""
    deadline = time.monotonic() + ACQUIRE_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in BUSY:
                return False
        if time.monotonic() >= deadline:
            raise UserError(_refusal(path, LOCK, HEARTBEAT))
        time.sleep(0.1)


def _probe(path: Path) -> str:
    """'held', 'free', or 'unknown' (never locked: a run from before run.lock, or flock does not work there)."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)  # read-only: a reader may not own the run dir
    except OSError:
        return "unknown"
    try:
        # shared, not exclusive: two `evomerge runs` at once must not read each other as the driver
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return "held" if e.errno in BUSY else "unknown"
    finally:
        os.close(fd)  # frees the shared lock, if taken
    return "free"


def _beating_elsewhere(path: Path, locked: bool) -> bool:
    """A fresh heartbeat of a driver the lock cannot vouch for: where the lock is unknown, or
    from another host (NFS mounted with nolock keeps flocks local, so another host's is invisible)."""
    beat = _read_json(path / HEARTBEAT)
    if not beat or beat.get("ended") or time.time() - beat.get("time", 0) > STALE_S:
        return False
    return not locked or beat.get("host") != HOST


def _write_owner(fd: int) -> None:
    # in place, not atomic_write_text: the lock belongs to this inode; a file renamed over it
    # would be a new, unlocked one that a second driver could lock
    owner = {"pid": os.getpid(), "host": HOST, "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)


def _refusal(path: Path, *sources: str) -> str:
    # the owner writes run.lock just after locking it: an instant where only the heartbeat names it
    owner = next((o for o in map(_read_json, (path / s for s in sources)) if o and "pid" in o), {})
    return f"{path} is running (pid {owner.get('pid', '?')} on {owner.get('host', '?')}); wait for it or kill it"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or caught mid-write (run.lock is written in place)
        return None
    return data if isinstance(data, dict) else None


def _last_session(path: Path) -> str:
    """search.log from the last `resumed` on: an earlier session's end says nothing of this one's."""
    log_file = RunDir(path).log_file
    log = log_file.read_text(encoding="utf-8") if log_file.is_file() else ""
    return log[log.rfind(" resumed\n") + 1:]


def _ended(path: Path, session: str) -> bool:
    """Whether the session logged the run's end (run/search.py finish): the summary line and,
    when the config has test tasks, the table after it, which a kill during test scoring leaves out."""
    if "best fitness" not in session:
        return False
    return "test-split table written" in session or not _has_test_split(path)


def _has_test_split(path: Path) -> bool:
    import yaml

    config = RunDir(path).config  # read raw: a state needs no validated config
    return config.is_file() and bool((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("test"))


class _Heartbeat:
    """heartbeat.json, rewritten by a daemon thread: when, which process on which host, evals done."""

    def __init__(self, path: Path):
        self.path = path
        self.evals, self.counted_to = 0, 0  # history.jsonl lines, and the byte after the last one counted
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="evomerge-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()  # at once: `evomerge runs` sees a fresh heartbeat before the first interval passes
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        # the driver leaves, cleanly or not: a reader relying on the heartbeat must not wait out
        # STALE_S; an unwritable disk must not hide the search's own exception
        with contextlib.suppress(OSError):
            self.beat(ended=True)

    def _loop(self) -> None:
        while not self.stopping.wait(INTERVAL_S):
            # a beat that cannot be written (disk full) is retried next interval; the
            # search's own writes report the fault
            with contextlib.suppress(OSError):
                self.beat()

    def beat(self, ended: bool = False) -> None:
        atomic_write_text(self.path / HEARTBEAT, json.dumps(
            {"time": time.time(), "pid": os.getpid(), "host": HOST, "evals": self._count(), "ended": ended}) + "\n")

    def _count(self) -> int:
        """Lines of history.jsonl, read on from the last beat's place: a long run's history is large."""
        history = RunDir(self.path).history
        if not history.is_file():
            return 0
        if history.stat().st_size < self.counted_to:  # replaced from outside: count afresh
            self.evals, self.counted_to = 0, 0
        with open(history, "rb") as f:
            f.seek(self.counted_to)
            chunk = f.read()
        # up to the last newline only: a torn last line (a crash mid-write) is cut off at resume
        # and written again, and must not be counted before it is whole
        whole = chunk.rfind(b"\n") + 1
        self.evals += chunk.count(b"\n", 0, whole)
        self.counted_to += whole
        return self.evals
