"""One driver per run directory, on a local disk and on S3 (moto): two drivers made to interleave at
the moment they decide (a pause hook, not timing) end with one running and the other refused in
one line; a driver whose lease another host took over stops before its next record; a holder
whose pid was recycled is recognised as gone."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

DRIVER = r'''
import os, sys, time
from raysd.errors import RaysdError
from raysd.run.locking import RunLock
run_dir, expiry, commit = sys.argv[1], float(sys.argv[2]), sys.argv[3]
try:
    with RunLock(run_dir, expiry) as lock:
        print("HELD", os.getpid(), flush=True)
        while not os.path.exists(commit):
            time.sleep(0.02)
        lock.check()  # what the pipeline does before each manifest write
        print("COMMITTED", flush=True)
except RaysdError as e:
    print(f"raysd: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
'''


def _start(run_dir: str, tmp: Path, name: str, env: dict, expiry: float = 300.0, **extra: str):
    commit = tmp / f"commit-{name}"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, run_dir, str(expiry), str(commit)], cwd=REPO, text=True,
                            env={**os.environ, **env, "RAYSD_PAUSE_DIR": str(tmp), **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, commit


def _wait_for(path_glob: Path, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not list(path_glob.parent.glob(path_glob.name)):
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.02)


def _held(proc) -> str:
    line = proc.stdout.readline()
    assert line.startswith("HELD"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.split()[1]


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run"), {}
    env = request.getfixturevalue("s3")
    return f"s3://raysd/lock-{tmp_path.name}", env


def test_two_drivers_deciding_at_once_one_runs_the_other_exits_2(where, tmp_path):
    run_dir, env = where
    a, _ = _start(run_dir, tmp_path, "a", env, RAYSD_PAUSE="lock_decided")
    _wait_for(tmp_path / "lock_decided.*.reached", "driver A deciding")  # A saw no lock and decided to take it
    b, commit_b = _start(run_dir, tmp_path, "b", env)
    pid_b = _held(b)  # B took it meanwhile
    (tmp_path / "lock_decided.go").touch()  # now A goes on with its decision
    assert a.wait(60) == 2
    err = a.stderr.read().strip().splitlines()
    assert len(err) == 1 and f"is in use by pid {pid_b}" in err[0], err
    commit_b.touch()
    assert b.wait(60) == 0 and "COMMITTED" in b.stdout.read()


def test_a_driver_whose_lease_is_taken_over_stops_before_its_next_record(where, tmp_path):
    run_dir, env = where
    a, commit_a = _start(run_dir, tmp_path, "a", env, expiry=2.0, RAYSD_LOCK_HOST="host-a",
                         RAYSD_PAUSE="lock_renew")
    _held(a)
    _wait_for(tmp_path / "lock_renew.*.reached", "A's first renewal")  # A's heartbeat stops here, A runs on
    time.sleep(2.5)  # older than its expiry by A's own clock: B will watch it, then take it over
    b, commit_b = _start(run_dir, tmp_path, "b", env, expiry=2.0, RAYSD_LOCK_HOST="host-b")
    pid_b = _held(b)
    (tmp_path / "lock_renew.go").touch()
    commit_a.touch()
    assert a.wait(60) == 2
    err = a.stderr.read().strip().splitlines()[-1]  # (after the renewal's warning in the log)
    assert err.startswith("raysd: error:") and f"taken over by pid {pid_b} on host-b" in err and "stopping" in err
    commit_b.touch()
    assert b.wait(60) == 0


def test_a_recycled_pid_is_not_a_live_holder(tmp_path):
    from raysd.run.locking import RunLock

    run = tmp_path / "run"
    run.mkdir()
    me = os.getpid()
    holder = {"token": "x", "host": __import__("socket").gethostname(), "pid": me, "pid_started": 1.0,
              "generation": 1, "beat": 0, "time": time.time()}
    (run / ".lock.1").write_text(json.dumps(holder))  # this pid, but a process that started in 1970
    with RunLock(str(run)) as lock:
        assert lock.gen == 2 and not (run / ".lock.1").exists()
    assert not list(run.glob(".lock*"))
    # an earlier raysd's lock file of a live process on this host is respected
    (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": holder["host"], "heartbeat": time.time()}))
    from raysd.errors import RaysdError

    with pytest.raises(RaysdError, match="is in use by pid"):
        RunLock(str(run)).__enter__()
