"""One run at a time per run directory: ``RUN/.lock`` is a lease.

The holder writes its host, pid and a heartbeat time into the lock and renews the heartbeat
every ``expiry / 5`` seconds while it runs. Another ``raysd run`` on the same directory is refused
with one line while the holder is alive: on the same host, its pid exists; on another host (a
resubmitted job after a head pod died, a second cluster), its heartbeat is younger than the
expiry. A lock left by a dead process (same host) or with a stale heartbeat (any host) is taken
over. The lease works on object stores too (one small object, rewritten).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from raysd.data import storage
from raysd.errors import RaysdError

LOCK = ".lock"
log = logging.getLogger("raysd")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str, expiry_s: float = 300.0):
        self.path = storage.join(run_dir, LOCK)
        self.expiry_s = expiry_s
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mine(self, holder: dict[str, Any]) -> bool:
        return holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = storage.read_json(self.path) if storage.exists(self.path) else None
        except (ValueError, UnicodeDecodeError, FileNotFoundError):
            return {}  # unreadable: nobody's
        return holder if isinstance(holder, dict) or holder is None else {}

    def holder_alive(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == self.me["host"]:
            return _alive(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("heartbeat", 0)) < self.expiry_s

    def __enter__(self) -> "RunLock":
        holder = self._read()
        if holder and not self._mine(holder):
            age = time.time() - float(holder.get("heartbeat", holder.get("since", 0)))
            where = f"pid {holder.get('pid')} on {holder.get('host')}"
            if self.holder_alive(holder):
                raise RaysdError(f"run {self.path.rsplit('/', 1)[0]} is in use by {where} (lock file {self.path}, "
                                 f"heartbeat {age:.0f}s ago); wait for it, or remove the lock file if that process "
                                 "is gone")
            log.info("run: taking over the lock of %s (no longer running; heartbeat %.0fs ago)", where, age)
        self._beat()
        self._thread = threading.Thread(target=self._renew, name="raysd-run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        storage.write_json(self.path, {**self.me, "heartbeat": time.time(), "expiry_s": self.expiry_s})

    def _renew(self) -> None:
        while not self._stop.wait(max(1.0, self.expiry_s / 5)):
            try:
                holder = self._read()
                if holder is not None and holder and not self._mine(holder):
                    log.warning("run: lock %s was taken over by pid %s on %s", self.path, holder.get("pid"),
                                holder.get("host"))
                    return
                self._beat()
            except OSError as e:  # a storage hiccup: try again at the next beat
                log.warning("run: could not renew the lock %s (%s)", self.path, e)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self._read()
            if holder and self._mine(holder):
                storage.remove(self.path)
        except (OSError, ValueError):
            pass
