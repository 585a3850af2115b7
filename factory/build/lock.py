"""A run lock: one build at a time per output directory.

Two builds of one output (two hand-started runs, or a scheduled build that outlasts its schedule:
KubeRay's RayCronJob has no concurrency policy) would both plan and write the same shards. The lock is a file created
with O_CREAT|O_EXCL (atomic on local file systems and on NFS v3+), holding JSON {pid, host, started}
so that a refused run can name its holder.

A lock whose holder is gone is taken over: on the same host that is certain when its pid no longer
runs. A pod that was killed leaves a lock from another host (each pod has its own host name); such a
lock is taken over only after `stale_after` seconds, when given: set it above the job's longest run
(e.g. the RayJob's activeDeadlineSeconds). Otherwise delete the file by hand once you know that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

UNWRITTEN_GRACE_S = 30.0  # a lock file is written right after it is created; one still empty after this was left by a crash


class LockHeld(RuntimeError):
    """Another run holds the lock; the message names it (pid, host, since)."""


def lock_path(out_dir: str | Path) -> Path:
    """Where a build of out_dir keeps its lock: beside the directory, not in it, so a first run can
    take the lock before the build claims the (still empty) directory, and publish never sees it."""
    out = Path(out_dir).resolve()
    return out.with_name(f".{out.name}.lock")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """`with RunLock(path): ...` holds the lock for the block and releases it on exit, also on an exception."""

    def __init__(self, path: str | Path, *, stale_after: float | None = None, log: Callable[[str], None] = print):
        self.path = Path(path)
        self.stale_after = stale_after
        self.log = log
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(UTC).isoformat(timespec="seconds")}
        self._owned: bytes | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the lock file, or take over a stale one; raise LockHeld when a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = (json.dumps(self.record) + "\n").encode()
        for _ in range(5):  # a lost race for a stale lock retries; a held lock raises at once
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_raise()
                continue
            with os.fdopen(fd, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            self._owned = content
            return
        raise LockHeld(f"could not take the lock {self.path}: other runs keep racing for it")

    def release(self) -> None:
        """Remove the lock file if it is still ours (a run that took it over keeps its own)."""
        if self._owned is None:
            return
        try:
            if self.path.read_bytes() == self._owned:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._owned = None

    def _take_over_or_raise(self) -> None:
        try:
            seen = self.path.read_bytes()
        except FileNotFoundError:  # released meanwhile: try again
            return
        holder = parse_holder(seen)
        reason = self._stale_reason(holder)
        if reason is None:
            who = (
                f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"
                if holder
                else "a run still writing it"
            )
            raise LockHeld(f"another run holds {self.path}: {who}; if that run is gone, delete the file")
        self.log(f"taking over the stale lock {self.path} ({reason})")
        self._remove_if_unchanged(seen)

    def _stale_reason(self, holder: dict) -> str | None:
        """Why the holder is surely gone, or None while it may still run."""
        if not holder:  # created but not written yet, or left half-written by a crash
            age = time.time() - mtime(self.path)
            return f"it holds no record and is {age:.0f} s old" if age > UNWRITTEN_GRACE_S else None
        pid, host = holder.get("pid"), holder.get("host")
        if host == self.record["host"] and isinstance(pid, int) and not pid_alive(pid):
            return f"pid {pid} on this host {host} no longer runs"
        age = time.time() - started_epoch(holder)
        if self.stale_after is not None and age > self.stale_after:
            return f"pid {pid} on host {host} took it {age:.0f} s ago, more than stale_after={self.stale_after:.0f} s"
        return None

    def _remove_if_unchanged(self, seen: bytes) -> None:
        """Move the stale file aside (atomic: of two runs taking it over, one wins the rename) and, if what was
        moved is not the stale lock that was judged but a fresh one taken meanwhile, put it back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_bytes() != seen:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink()


def parse_holder(content: bytes) -> dict:
    try:
        holder = json.loads(content)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def started_epoch(holder: dict) -> float:
    try:
        return datetime.fromisoformat(holder["started"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0
