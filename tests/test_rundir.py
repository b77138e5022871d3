"""The run directory without Ray: layout, cached metas, claims of output directories, the manifest."""

import json

import numpy as np
import pytest

from raysd.config import load_config
from raysd.data import imageset
from raysd.errors import RaysdError
from raysd.run.manifest import read_manifest
from raysd.run.rundir import Run, claim


def write_split(run: Run, split: str, labels: np.ndarray) -> None:
    d = run.split_dir(split)
    entry = imageset.write_shard(d, "part-0.parquet", np.arange(len(labels)), labels,
                                 np.zeros((len(labels), 8, 8, 3), np.uint8))
    imageset.write_meta(d, imageset.set_meta(dataset="toy", split=split, class_names=["a", "b"], labels=labels,
                                             image_shape=(8, 8, 3), files={"part-0.parquet": entry},
                                             provenance={"fingerprint": "f"}))


def test_layout_and_metas_read_once(tmp_path, monkeypatch):
    run = Run(load_config("demo", overrides={"run_dir": str(tmp_path / "r")}))
    assert run.ckpt_root("unet").endswith("/r/checkpoints/unet") and run.search_dir(2).endswith("/r/search_2")
    assert not run.is_prepared()
    for split in ("train", "val", "test"):
        write_split(run, split, np.array([0, 1, 1, 0, 1]))
    assert run.is_prepared() and run.num_classes == 2 and run.image_size == (8, 8) and run.num_train == 5
    reads = []
    monkeypatch.setattr(imageset, "read_meta", lambda d: reads.append(d) or {})
    run.meta("train"), run.meta("train"), run.train_meta  # noqa: B018 - cached: no further reads
    assert reads == []
    plan = run.plan(7, "real")
    assert len(plan) == 7 and plan.counts == [3, 4]  # 2:3 of the real train split, largest remainder


def test_claim_refuses_other_settings_and_foreign_directories(tmp_path):
    d = str(tmp_path / "out")
    claim(d, "aaaa", what="generate", body={"x": 1})
    assert json.loads((tmp_path / "out" / "claim.json").read_text()) == {"fingerprint": "aaaa", "x": 1}
    (tmp_path / "out" / "part").write_text("work in progress")
    claim(d, "aaaa", what="generate")  # the same settings: kept, resumed
    assert (tmp_path / "out" / "part").exists()
    with pytest.raises(RaysdError, match="made with other settings; pass --restart"):
        claim(d, "bbbb", what="generate")
    claim(d, "bbbb", what="generate", restart=True)
    assert not (tmp_path / "out" / "part").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("user data")
    with pytest.raises(RaysdError, match="is not a raysd search directory"):
        claim(str(tmp_path / "foreign"), "cccc", what="search")


def test_a_manifest_without_stages_is_refused_not_treated_as_empty(tmp_path):
    assert read_manifest(str(tmp_path)) == {"stages": {}}  # no manifest yet: a new run
    (tmp_path / "manifest.json").write_text(json.dumps({"provenance": {}}))
    with pytest.raises(RaysdError, match="not a raysd manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(RaysdError, match="damaged"):
        read_manifest(str(tmp_path))


def test_run_lock_is_a_lease(tmp_path):
    import os
    import socket
    import time

    from raysd.run.locking import RunLock

    def held_by(gen=1, **holder):
        for old in tmp_path.glob(".lock*"):
            old.unlink()
        (tmp_path / f".lock.{gen}").write_text(json.dumps({"generation": gen, "beat": 0, **holder}))

    me = socket.gethostname()
    held_by(pid=os.getppid(), host=me, time=time.time())  # a live process on this host
    with pytest.raises(RaysdError, match="is in use by pid"):
        RunLock(str(tmp_path)).__enter__()
    held_by(pid=2**31 - 5, host=me, time=time.time())  # a dead one: taken over at once
    with RunLock(str(tmp_path)) as held:
        assert held.gen == 2 and json.loads((tmp_path / ".lock.2").read_text())["pid"] == os.getpid()
        assert not (tmp_path / ".lock.1").exists()
    assert not list(tmp_path.glob(".lock*"))
    held_by(pid=1, host="head-pod-7", time=time.time() - 10)  # another host, recent by its clock: refused
    with pytest.raises(RaysdError, match="on head-pod-7 .*heartbeat 10s ago"):
        RunLock(str(tmp_path), expiry_s=60).__enter__()
    held_by(pid=1, host="head-pod-7", time=time.time() - 120, expiry_s=2.0)  # old, and not beating while watched
    t0 = time.monotonic()
    with RunLock(str(tmp_path), expiry_s=2.0) as held:
        assert time.monotonic() - t0 >= 1.4  # it watched the heartbeat (1.5 renewal periods) before taking over
        assert json.loads((tmp_path / ".lock.2").read_text())["host"] == me