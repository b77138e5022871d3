"""One run at a time per run directory: ``RUN/.lock`` names the process that holds it.

A second ``raysd run`` on the same directory refuses with the holder's pid and host. A lock
left by a process that no longer exists (same host) is stale and taken over.
"""

from __future__ import annotations

import os
import socket
import time

from raysd.data import storage
from raysd.errors import RaysdError

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str):
        self.path = storage.join(run_dir, LOCK)
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}

    def __enter__(self) -> "RunLock":
        if storage.exists(self.path):
            try:
                holder = storage.read_json(self.path)
            except ValueError:
                holder = {}
            same_host = holder.get("host") == self.me["host"]
            if holder.get("pid") == self.me["pid"] and same_host:
                return self
            if not same_host or _alive(int(holder.get("pid", -1))):
                where = f"pid {holder.get('pid')} on {holder.get('host')}"
                raise RaysdError(f"run {self.path.rsplit('/', 1)[0]} is in use by {where} (lock file {self.path}); "
                                 "wait for it, or remove the lock file if that process is gone")
        storage.write_json_atomic(self.path, self.me)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if storage.exists(self.path) and storage.read_json(self.path).get("pid") == self.me["pid"]:
                storage.remove(self.path)
        except (OSError, ValueError):
            pass
