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


# ---- object storage ---------------------------------------------------------------------------

LEASE_TTL_S = 600.0  # a lease lasts this long unless renewed; a killed run's lease is taken over once it has expired


class S3Lease:
    """The run lock of an `s3://` output: a lease object beside the output prefix (`.NAME.lock`),
    holding {owner, pid, host, started, expires}. It is created with a conditional write (`If-None-Match:
    *`: of two runs, exactly one creates it), renewed every ttl/3 while held, and taken over once expired
    with a write conditional on the expired object's ETag (`If-Match`: of two runs taking it over, one
    wins). S3 has offered both since 2024; a store without them would let two runs in, so on other object
    stores the lock is best effort (see the README). `with S3Lease(uri): ...` holds it for the block."""

    def __init__(self, output_uri: str, *, ttl: float = LEASE_TTL_S, log: Callable[[str], None] = print, client=None):
        import boto3

        bucket, _, prefix = output_uri.removeprefix("s3://").partition("/")
        parent, _, name = prefix.rstrip("/").rpartition("/")
        self.bucket, self.key = bucket, f"{parent}/.{name}.lock" if parent else f".{name}.lock"
        self.uri, self.ttl, self.log = f"s3://{self.bucket}/{self.key}", ttl, log
        self.client = client or boto3.client("s3")
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self._stop = None

    def __enter__(self) -> S3Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def record(self) -> bytes:
        now = time.time()
        holder = {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname()}
        started = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
        return (json.dumps({**holder, "started": started, "expires": now + self.ttl}) + "\n").encode()

    def put(self, **condition) -> bool:
        """One conditional write of a fresh record; False when the condition failed."""
        from botocore.exceptions import ClientError

        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self.record(), **condition)["ETag"]
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412"):
                return False
            raise

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        for _ in range(5):
            if self.put(IfNoneMatch="*"):
                break
            try:
                seen = self.client.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError:  # released meanwhile: try again
                continue
            holder = parse_holder(seen["Body"].read())
            expires = holder.get("expires")
            if isinstance(expires, (int, float)) and expires > time.time():
                until = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")
                raise LockHeld(
                    f"another run holds {self.uri}: pid {holder.get('pid')} on host {holder.get('host')} since"
                    f" {holder.get('started')}, its lease renewed until {until}"
                )
            if self.put(IfMatch=seen["ETag"]):
                self.log(f"taking over the expired lease {self.uri} (pid {holder.get('pid')} on host {holder.get('host')})")
                break
        else:
            raise LockHeld(f"could not take the lease {self.uri}: other runs keep racing for it")
        self._renew_in_background()

    def _renew_in_background(self) -> None:
        import threading

        self._stop = threading.Event()

        def renew() -> None:
            while not self._stop.wait(self.ttl / 3):
                if not self.put(IfMatch=self.etag):
                    self.log(f"lost the lease {self.uri}: another run took it over")
                    return

        threading.Thread(target=renew, name="s3-lease", daemon=True).start()

    def release(self) -> None:
        """Delete the lease if it is still ours (read, compare, delete: a run that took it over keeps its own)."""
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        try:
            seen = self.client.get_object(Bucket=self.bucket, Key=self.key)
            if parse_holder(seen["Body"].read()).get("owner") == self.owner:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as err:  # the lease expires by itself; never fail a finished run over it
            self.log(f"could not release the lease {self.uri}: {type(err).__name__}")


def output_lock(output: str | Path, *, stale_after: float | None = None, log: Callable[[str], None] = print):
    """The run lock of a build output: a lock file beside a local directory (or a `file://` path), a
    lease object beside an `s3://` prefix. Other stores have no lock: keeping two runs apart there is
    the scheduler's job (the README says so)."""
    from contextlib import nullcontext

    text = str(output)
    if text.startswith("s3://"):
        return S3Lease(text, log=log)
    if text.startswith("file://"):
        return RunLock(lock_path(text.removeprefix("file://")), stale_after=stale_after, log=log)
    if "://" in text:
        log(f"no run lock on {text.split('://')[0]}:// storage: keep two runs of {text} apart yourself")
        return nullcontext()
    return RunLock(lock_path(text), stale_after=stale_after, log=log)
