"""The latent cache of a training stage (``RUN/cache/latents-KEY``): the posterior (``mean``,
and ``logvar`` for a VAE base) of every train image at the model's resolution, with its
``sample_id`` and ``label``, in Parquet shards beside ``meta.json`` (every shard's rows and
SHA-256, written last). Ray Data's ``write_parquet`` writes it for VAE bases; a pixel-space base
needs no model for it and :func:`write_cache` writes it directly. Training workers read it with
:func:`read_cache`, plain pyarrow (no Ray), from any storage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raysd.data import imageset, storage
from raysd.errors import RaysdError

FORMAT = "raysd.latents/1"
ROWS_PER_SHARD = 8192


def describe(files: dict[str, dict], rows: int, *, expected_rows: int, base: str) -> dict[str, Any]:
    """The cache's ``meta.json`` body; refuses a cache that does not hold every train image."""
    if rows != expected_rows:
        raise RuntimeError(f"latent cache: {rows} rows for {expected_rows} images")
    return {"format": FORMAT, "files": files, "num_rows": rows, "base": base}


def write_cache(cache_dir: str, sample_ids: np.ndarray, labels: np.ndarray, mean: np.ndarray,
                logvar: np.ndarray | None, *, base: str, keep: set[str]) -> None:
    """Write the shards of a cache its caller has claimed, then ``meta.json`` (the commit record).
    Leftovers of an interrupted write (files no record lists, other than ``keep``) are removed first."""
    storage.remove(storage.join(cache_dir, imageset.META))
    storage.remove_unlisted(cache_dir, keep=keep)
    files = {}
    for k, lo in enumerate(range(0, len(labels), ROWS_PER_SHARD)):
        sl = slice(lo, lo + ROWS_PER_SHARD)
        fields = [pa.field("sample_id", pa.int64()), pa.field("label", pa.int64())]
        cols = [pa.array(np.asarray(sample_ids[sl], np.int64)), pa.array(np.asarray(labels[sl], np.int64))]
        for name, arr in (("mean", mean), ("logvar", logvar)):
            if arr is not None:
                f, c = imageset.tensor_column(name, arr[sl], np.float32)
                fields.append(f)
                cols.append(c)
        name = f"part-{k:05d}.parquet"
        files[name] = imageset.write_table(cache_dir, name, pa.Table.from_arrays(cols, schema=pa.schema(fields)))
    storage.write_json(storage.join(cache_dir, imageset.META),
                       describe(files, len(labels), expected_rows=len(labels), base=base))


def read_cache(cache_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(labels, mean, logvar or None), rows in sample_id order, every shard checked against its
    SHA-256; a cache that is incomplete, damaged or not a latent cache is refused by name."""
    if not imageset.is_complete(cache_dir):
        raise RaysdError(f"latent cache {cache_dir} is incomplete (no {imageset.META}); rerun the training stage")
    meta = storage.read_json(storage.join(cache_dir, imageset.META))
    if meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise RaysdError(f"latent cache {cache_dir}: {imageset.META} is not a latent cache description ({FORMAT})")
    ids, labels, mean, logvar = [], [], [], []
    for name, info in sorted(meta["files"].items()):
        storage.check_member_name(name, f"latent cache {cache_dir}: {imageset.META}")
        table = imageset.read_shard(storage.join(cache_dir, name), info)
        ids.append(table.column("sample_id").to_numpy().astype(np.int64))
        labels.append(table.column("label").to_numpy().astype(np.int64))
        mean.append(imageset.tensor_array(table, "mean").astype(np.float32, copy=False))
        if "logvar" in table.column_names:
            logvar.append(imageset.tensor_array(table, "logvar").astype(np.float32, copy=False))
    if not ids:
        raise RaysdError(f"latent cache {cache_dir} holds no rows")
    order = np.argsort(np.concatenate(ids), kind="stable")
    if len(order) != meta.get("num_rows"):
        raise RaysdError(f"latent cache {cache_dir}: {len(order)} rows, {imageset.META} says {meta.get('num_rows')}")
    return (np.concatenate(labels)[order], np.concatenate(mean)[order],
            np.concatenate(logvar)[order] if logvar else None)
