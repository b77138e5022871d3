"""Stage: a real dataset -> canonical Parquet sets ``OUT/{train,val,test}`` through Ray Data.

Each split is written into a temporary directory, described by ``meta.json`` (shards, row
counts, SHA-256, class counts, source checksums) and only then renamed into place, so a crash
never leaves a directory that looks complete. A rerun with the same source skips the split; an
existing split that holds something else is refused.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from raysd import sets, storage
from raysd.datasets import SPLITS, RealDataset, load_dataset
from raysd.errors import RaysdError

log = logging.getLogger("raysd")

ROWS_PER_FILE = 10_000


def prepare_dataset(name: str, out: str, *, data_dir: str | None = None, download: bool = True) -> dict[str, Any]:
    """Load ``name`` and write its three splits under ``out``; returns {split: meta}."""
    ds = load_dataset(name, data_dir, download)
    return write_dataset(ds, out)


def write_dataset(ds: RealDataset, out: str) -> dict[str, Any]:
    fingerprint = ds.fingerprint()
    metas: dict[str, Any] = {}
    pending = []
    for split in SPLITS:
        target = storage.join(out, split)
        if sets.is_complete(target):
            meta = sets.read_meta(target)
            if meta.get("provenance", {}).get("fingerprint") != fingerprint:
                raise RaysdError(
                    f"prepare: {target} already holds a different dataset "
                    f"({meta.get('dataset')!r}, fingerprint {meta.get('provenance', {}).get('fingerprint')}); "
                    "choose another --out or remove it"
                )
            log.info("prepare: %s already complete (%d rows), skipped", target, meta["num_rows"])
            metas[split] = meta
        elif storage.exists(target):
            raise RaysdError(f"prepare: {target} exists but is not a raysd image set; choose another --out or remove it")
        else:
            pending.append(split)
    if pending:
        from raysd.raycluster import ensure_ray

        ensure_ray()
        for split in pending:
            metas[split] = _write_split(ds, split, storage.join(out, split), fingerprint)
    return metas


def _write_split(ds: RealDataset, split: str, target: str, fingerprint: str) -> dict[str, Any]:
    import ray.data
    from ray.data.datasource import FilenameProvider

    class _Names(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}"  # Ray appends "-<i>.parquet"

    t0 = time.perf_counter()
    sp = ds.splits[split]
    n = len(sp.labels)
    tmp = f"{target}{storage.TMP_MARK}prepare"
    storage.remove(tmp)  # a leftover of an interrupted run; ours by its name
    ids = np.arange(n, dtype=np.int64)
    tables = [
        sets.shard_table(ids[i : i + ROWS_PER_FILE], sp.labels[i : i + ROWS_PER_FILE], sp.images[i : i + ROWS_PER_FILE])
        for i in range(0, n, ROWS_PER_FILE)
    ]
    fs, fs_path = storage.filesystem(tmp)
    ray.data.from_arrow(tables).write_parquet(fs_path, filesystem=fs, filename_provider=_Names(), mode=ray.data.SaveMode.OVERWRITE)
    files = {}
    for fn in storage.listdir(tmp):
        table = sets.read_shard(storage.join(tmp, fn))
        files[fn] = {"rows": table.num_rows, "sha256": storage.sha256_file(storage.join(tmp, fn))}
    if sum(f["rows"] for f in files.values()) != n:
        raise RuntimeError(f"prepare: wrote {sum(f['rows'] for f in files.values())} rows for {n} images")
    meta = sets.set_meta(
        dataset=ds.name, split=split, class_names=ds.class_names, labels=sp.labels,
        image_shape=ds.image_shape, files=files, provenance={**ds.provenance, "fingerprint": fingerprint},
    )
    sets.write_meta(tmp, meta)
    storage.rename(tmp, target)
    log.info("prepare: %s %s: %d images, %d shard(s), %.1fs", ds.name, split, n, len(files), time.perf_counter() - t0)
    return sets.read_meta(target)
