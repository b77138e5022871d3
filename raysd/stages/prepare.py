"""Stage: a real dataset -> canonical Parquet sets ``OUT/{train,val,test}``.

Each split's shards are written into its directory, then ``meta.json`` (shards, row counts,
SHA-256, class counts, source checksums) last: a directory without it is incomplete and no reader
uses it, so a crash never leaves a set that looks complete, on a local disk or an object store.
A rerun with the same source skips the split; a directory that holds something else is refused.

The splits are already in the driver's memory (the dataset loaders read them whole), so the
driver writes their shards itself: through Ray Data the three demo splits took 5.6 s, almost all
of it starting Ray Data's actors and a write task, for 2 MB of Parquet.
:func:`write_parquet_set` is the write-describe-commit sequence of a set Ray Data computes (the
latent cache of a VAE base).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

import ray.data
from ray.data.datasource import FilenameProvider

from raysd.data import imageset, storage
from raysd.data.sources import SPLITS, RealDataset, load_dataset
from raysd.errors import RaysdError
from raysd.run.rundir import CLAIM, Run, claim

log = logging.getLogger("raysd")

ROWS_PER_FILE = 10_000


def prepare_dataset(name: str, out: str, *, data_dir: str | None = None, download: bool = True) -> dict[str, Any]:
    """Load ``name`` and write its three splits under ``out``; returns {split: meta}."""
    ds = load_dataset(name, data_dir, download)
    return write_dataset(ds, out)


def write_dataset(ds: RealDataset, out: str) -> dict[str, Any]:
    if storage.isfile(out):
        raise RaysdError(f"prepare: --out {out} is a file; give a directory (it will hold train/, val/ and test/)")
    fingerprint = ds.fingerprint()
    metas: dict[str, Any] = {}
    pending = []
    for split in SPLITS:
        target = storage.join(out, split)
        if imageset.is_complete(target):
            meta = imageset.read_meta(target)
            if meta.get("provenance", {}).get("fingerprint") != fingerprint:
                raise RaysdError(
                    f"prepare: {target} already holds a different dataset "
                    f"({meta.get('dataset')!r}, fingerprint {meta.get('provenance', {}).get('fingerprint')}); "
                    "choose another --out or remove it"
                )
            log.info("prepare: %s already complete (%d rows), skipped", target, meta["num_rows"])
            metas[split] = meta
        else:
            claim(target, fingerprint, what="prepare", fix="choose another --out")  # a foreign directory: refused
            pending.append(split)
    for split in pending:
        metas[split] = _write_split(ds, split, storage.join(out, split), fingerprint)
    return metas


class _Names(FilenameProvider):
    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}-{write_uuid}"  # Ray appends "-<i>.parquet"; APPEND needs the write uuid


def write_parquet_set(ds: "ray.data.Dataset", target: str, describe: Callable[[dict[str, dict], int], dict]) -> None:
    """Write a Ray dataset as a set directory that its caller has claimed: shards straight into
    their final place, then ``meta.json`` (``describe(files, rows)`` with every shard's rows and
    SHA-256) as the commit record. No rename (object stores have none); the leftovers of an
    interrupted write, which no record lists, are removed first."""
    storage.remove(storage.join(target, imageset.META))
    storage.remove_unlisted(target, keep={CLAIM})
    fs, fs_path = storage.filesystem(target)
    ds.write_parquet(fs_path, filesystem=fs, filename_provider=_Names(), mode=ray.data.SaveMode.APPEND)
    files = {}
    for fn in storage.listdir(target):
        if fn.endswith(".parquet"):
            table = imageset.read_shard(storage.join(target, fn))
            files[fn] = {"rows": table.num_rows, "sha256": storage.sha256_file(storage.join(target, fn))}
    storage.write_json(storage.join(target, imageset.META), describe(files, sum(f["rows"] for f in files.values())))


def _write_split(ds: RealDataset, split: str, target: str, fingerprint: str) -> dict[str, Any]:
    """Write one claimed split: the leftovers of an interrupted write (listed by no record) removed,
    its shards, then ``meta.json``."""
    t0 = time.perf_counter()
    sp = ds.splits[split]
    n = len(sp.labels)
    storage.remove(storage.join(target, imageset.META))
    storage.remove_unlisted(target, keep={CLAIM})
    files = {}
    for lo in range(0, n, ROWS_PER_FILE):
        hi, name = min(n, lo + ROWS_PER_FILE), f"part-{lo // ROWS_PER_FILE:05d}.parquet"
        files[name] = imageset.write_shard(target, name, np.arange(lo, hi, dtype=np.int64), sp.labels[lo:hi],
                                           sp.images[lo:hi])
    imageset.write_meta(target, imageset.set_meta(
        dataset=ds.name, split=split, class_names=ds.class_names, labels=sp.labels, image_shape=ds.image_shape,
        files=files, provenance={**ds.provenance, "fingerprint": fingerprint}))
    log.info("prepare: %s %s: %d images, %d shard(s), %.1fs", ds.name, split, n, len(files), time.perf_counter() - t0)
    return imageset.read_meta(target)


def ensure_prepared(run: Run) -> None:
    """The run's real data (RUN/data), prepared on first use."""
    if not run.is_prepared():
        cfg = run.cfg
        prepare_dataset(cfg.dataset.name, run.data_dir, data_dir=cfg.dataset.data_dir, download=cfg.dataset.download)
