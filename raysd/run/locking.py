"""One driver at a time per run directory: a lease in ``RUN/.lock.N`` (N, the lease's generation).

Acquisition is atomic: a driver takes generation N only by creating ``.lock.N`` exclusively (a
hard link of a written file on a local disk; a conditional PUT, ``If-None-Match: *``, on S3), so of
two drivers that decided at once, one creates it and the other finds it taken. The holder renews
its lease every ``expiry / 5`` seconds (a counter and a time in its file) and, before each record
it commits, checks that no later generation exists; a driver whose lease was taken over stops
there with one line. A lease is taken over (generation N + 1) only from a holder that is gone:
on the same host, its process (pid and start time) no longer runs; on another host, its
heartbeat counter did not move while this host watched it for 1.5 renewal periods (this host's
clock only; the holder's clock only decides whether to watch). The stage commands take the same
lease as ``raysd run`` (re-entrant within a process).

Object stores without conditional writes (other than S3) get the same protocol without the
atomic create (said once in the log): two drivers started within the same second could both run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

from raysd.data import storage
from raysd.errors import RaysdError
from raysd.faults import maybe_pause

log = logging.getLogger("raysd")
PREFIX = ".lock."
LEGACY = ".lock"  # raysd before generations: one file, rewritten (generation 0)
_GEN_RE = re.compile(r"^\.lock\.(\d+)$")
_HELD: dict[str, "RunLock"] = {}  # run dir -> this process's lease on it


def _host() -> str:
    return os.environ.get("RAYSD_LOCK_HOST") or socket.gethostname()  # the tests stand in for another host


def _started(pid: int) -> float | None:
    """When process ``pid`` started (None: no such process)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def generations(run_dir: str) -> list[int]:
    """Generations present, oldest first (0: a lock file of an earlier raysd)."""
    names = storage.listdir(run_dir)
    out = sorted(int(m.group(1)) for n in names if (m := _GEN_RE.match(n)))
    return ([0] if LEGACY in names else []) + out


def _path(run_dir: str, gen: int) -> str:
    return storage.join(run_dir, LEGACY if gen == 0 else f"{PREFIX}{gen}")


def _read(run_dir: str, gen: int) -> dict[str, Any]:
    try:
        holder = storage.read_json(_path(run_dir, gen))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(holder, dict):
        return {}
    if gen == 0:  # the earlier format: its heartbeat is its time
        holder.setdefault("time", holder.get("heartbeat", 0.0))
    return holder


def create_exclusive(path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there, atomically; False when something was."""
    if storage.is_local(path):
        target = storage.local_path(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}{storage.TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)  # fails if target exists: the whole file appears at once, or nothing
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    if str(path).startswith("s3://"):
        return _s3_create_exclusive(path, data)
    _warn_not_atomic(path)
    if storage.exists(path):
        return False
    storage.write_bytes(path, data)
    return True


def _s3_create_exclusive(path: str, data: bytes) -> bool:
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, key = str(path)[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ.get(storage.ENDPOINT_VAR) or None)
    for _ in range(5):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412"):
                return False
            if code not in ("ConditionalRequestConflict", "409"):
                raise RaysdError(f"run lock: cannot write {path} ({code}: {e})") from None
            time.sleep(0.2)  # a concurrent conditional write: S3 asks to retry
    return not storage.exists(path)


_WARNED: set[str] = set()


def _warn_not_atomic(path: str) -> None:
    scheme = str(path).split("://", 1)[0]
    if scheme not in _WARNED:
        _WARNED.add(scheme)
        log.warning("run lock: %s:// has no conditional write here; two drivers started within the same second "
                    "could both take %s", scheme, path)


class RunLock:
    """The lease of one run directory, held in a ``with`` block."""

    def __init__(self, run_dir: str, expiry_s: float = 300.0, *, command: str = "raysd"):
        self.run_dir, self.expiry_s = run_dir, expiry_s
        self.me = {"token": uuid.uuid4().hex, "host": _host(), "pid": os.getpid(), "pid_started": _started(os.getpid()),
                   "command": command, "expiry_s": expiry_s}
        self.gen: int | None = None
        self.beat = 0
        self.lost: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._depth = 0

    # -- acquiring -----------------------------------------------------------------------------

    def __enter__(self) -> "RunLock":
        held = _HELD.get(self.run_dir)
        if held is not None:  # this process holds it already (a stage inside `raysd run`)
            held._depth += 1
            return held
        storage.makedirs(self.run_dir)
        for _ in range(10):
            gens = generations(self.run_dir)
            top = gens[-1] if gens else None
            if top is not None:
                holder = _read(self.run_dir, top)
                if self.alive(holder):
                    raise RaysdError(self._in_use(holder))
            maybe_pause("lock_decided")  # the fault tests make two drivers interleave here
            want = (top or 0) + 1
            if create_exclusive(_path(self.run_dir, want), self._record(want)):
                self.gen = want
                break
        else:
            raise RaysdError(f"run {self.run_dir}: could not take the run lock (it changed hands ten times)")
        if top is not None:
            log.info("run: took over the run lock of %s (gone)", self._who(_read(self.run_dir, top) or {}))
        for g in generations(self.run_dir):  # the leases this one replaced
            if g < self.gen:
                storage.remove(_path(self.run_dir, g))
        _HELD[self.run_dir] = self
        self._thread = threading.Thread(target=self._renew, name="raysd-run-lock", daemon=True)
        self._thread.start()
        maybe_pause("lock_held")
        return self

    def alive(self, holder: dict[str, Any]) -> bool:
        """Whether the holder of a lease may still be running."""
        if not holder:
            return False
        if holder.get("host") == self.me["host"]:
            started = _started(int(holder.get("pid", -1)))
            want = holder.get("pid_started")
            return started is not None and (want is None or abs(started - float(want)) < 1.0)
        expiry = float(holder.get("expiry_s") or self.expiry_s)
        if time.time() - float(holder.get("time", 0)) < expiry:
            return True  # recent by its own clock: taken as alive, never taken over on that alone
        return self._watch(holder, expiry)

    def _watch(self, holder: dict[str, Any], expiry: float) -> bool:
        """True when the holder's heartbeat moves within 1.5 renewal periods of this host's clock."""
        gen = generations(self.run_dir)[-1]
        deadline = time.monotonic() + 1.5 * max(1.0, expiry / 5)
        log.info("run: the run lock of %s looks stale; watching its heartbeat for %.0f s", self._who(holder),
                 deadline - time.monotonic())
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.2, expiry / 50)))
            now = _read(self.run_dir, gen)
            if now.get("beat") != holder.get("beat") or now.get("token") != holder.get("token"):
                return True
        return False

    def _record(self, gen: int) -> bytes:
        return json.dumps({**self.me, "generation": gen, "beat": self.beat, "time": time.time()}).encode()

    @staticmethod
    def _who(holder: dict[str, Any]) -> str:
        return f"pid {holder.get('pid')} on {holder.get('host')}"

    def _in_use(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("time", 0))
        return (f"run {self.run_dir} is in use by {self._who(holder)} ({holder.get('command', 'raysd')}, heartbeat "
                f"{age:.0f}s ago by its clock); wait for it to finish, or, if that process is gone, remove "
                f"{_path(self.run_dir, int(holder.get('generation') or 0))}")

    # -- holding -------------------------------------------------------------------------------

    def _renew(self) -> None:
        while not self._stop.wait(max(1.0, self.expiry_s / 5)):
            maybe_pause("lock_renew")
            try:
                if self._taken():
                    return
                self.beat += 1
                storage.write_bytes(_path(self.run_dir, int(self.gen or 0)), self._record(int(self.gen or 0)))
            except OSError as e:  # a storage hiccup: try again at the next beat
                log.warning("run: could not renew the run lock of %s (%s)", self.run_dir, e)

    def _taken(self) -> bool:
        later = [g for g in generations(self.run_dir) if g > int(self.gen or 0)]
        if later and self.lost is None:
            self.lost = _read(self.run_dir, later[-1]) or {"generation": later[-1]}
            log.warning("run: the run lock of %s was taken over by %s", self.run_dir, self._who(self.lost))
        return self.lost is not None

    def check(self) -> None:
        """Refuse to go on (before a record is committed) when the lease was taken over."""
        if self._taken():
            raise RaysdError(f"run {self.run_dir}: the run lock was taken over by {self._who(self.lost or {})} "
                             "(it judged this driver gone); stopping before writing another record")

    def __exit__(self, *exc: object) -> None:
        if self._depth:
            self._depth -= 1
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _HELD.pop(self.run_dir, None)
        try:
            if not self._taken():
                storage.remove(_path(self.run_dir, int(self.gen or 0)))
        except (OSError, ValueError):
            pass


def check_held(run_dir: str) -> None:
    """Before a driver commits a record of ``run_dir``: stop if this process's lease on it was taken."""
    held = _HELD.get(run_dir)
    if held is not None:
        held.check()
