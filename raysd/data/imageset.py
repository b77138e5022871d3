"""The canonical image-set layout, one for real and synthetic sets (DESIGN.md section 3).

A set is a directory of Parquet shards with columns ``sample_id`` int64, ``label`` int64 and
``image`` uint8 H x W x 3 (stored as Ray Data's tensor extension, ``ray.data.arrow_tensor_v2``
over ``large_list<uint8>``, so ``ray.data.read_parquet`` yields tensors), beside ``meta.json``.
``meta.json`` lists every shard with its row count and SHA-256 and is written last: a directory
without it is incomplete and every reader here refuses it.

This module is plain pyarrow + numpy (no Ray), so workers, actors and tests can use it alone.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysd.data import storage
from raysd.errors import RaysdError

SET_FORMAT = "raysd.set/1"
META = "meta.json"
TENSOR_EXT = b"ray.data.arrow_tensor_v2"


@dataclass
class ImageSet:
    """Images in memory: ``images`` (N, H, W, 3) uint8, ``labels`` and ``sample_ids`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names", []))

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", len(self.class_names)))


def tensor_column(name: str, arr: np.ndarray, dtype: type = np.uint8) -> tuple[pa.Field, pa.Array]:
    """(N, ...) -> a large_list column of ``dtype`` tagged as Ray's tensor extension."""
    arr = np.ascontiguousarray(arr, dtype=dtype)
    n, shape = arr.shape[0], list(arr.shape[1:])
    per = int(np.prod(shape)) if shape else 1
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * per, type=pa.int64())
    values = pa.array(arr.reshape(-1), type=pa.from_numpy_dtype(arr.dtype))
    col = pa.LargeListArray.from_arrays(offsets, values)
    meta = {b"ARROW:extension:name": TENSOR_EXT, b"ARROW:extension:metadata": json.dumps(shape).encode()}
    return pa.field(name, pa.large_list(values.type), metadata=meta), col


def tensor_array(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column (ours, or Ray Data's ``write_parquet``) as one (N, ...) array, whether or
    not Ray's extension type is registered in this process (its shape is in the field either way)."""
    col = table.column(name).combine_chunks()
    typ = table.schema.field(name).type
    if isinstance(col, pa.ExtensionArray):
        shape = tuple(int(d) for d in typ.shape)
        col = col.storage
    else:
        meta = table.schema.field(name).metadata or {}
        shape = tuple(json.loads(meta.get(b"ARROW:extension:metadata", b"[]")))
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if not shape:  # a plain list column: one flat row each
        shape = (flat.size // table.num_rows,) if table.num_rows else (0,)
    return flat.reshape((table.num_rows, *shape))


def shard_table(sample_ids: np.ndarray, labels: np.ndarray, images: np.ndarray,
                extra: dict[str, np.ndarray] | None = None) -> pa.Table:
    """A Parquet-ready table; ``image`` (and any ``extra`` uint8 tensors) carry Ray's tensor type."""
    fields = [pa.field("sample_id", pa.int64()), pa.field("label", pa.int64())]
    cols = [pa.array(np.asarray(sample_ids, np.int64)), pa.array(np.asarray(labels, np.int64))]
    for name, arr in {"image": images, **(extra or {})}.items():
        f, c = tensor_column(name, arr)
        fields.append(f)
        cols.append(c)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def write_shard(set_dir: str, name: str, sample_ids: np.ndarray, labels: np.ndarray, images: np.ndarray,
                extra: dict[str, np.ndarray] | None = None) -> dict:
    """Write one shard atomically; returns its entry for ``meta.json`` (rows, bytes, sha256)."""
    return write_table(set_dir, name, shard_table(sample_ids, labels, images, extra))


def write_table(set_dir: str, name: str, table: pa.Table) -> dict:
    """Write any Parquet table as one file at once; returns its ``meta.json`` entry."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    storage.write_bytes(storage.join(set_dir, name), data)
    return {"rows": table.num_rows, "bytes": len(data), "sha256": storage.sha256_bytes(data)}


def write_meta(set_dir: str, meta: dict[str, Any]) -> None:
    """Mark the set complete. Call last, after every shard listed in ``meta["files"]`` exists."""
    meta = {"format": SET_FORMAT, **meta}
    storage.write_json(storage.join(set_dir, META), meta)


def is_complete(set_dir: str) -> bool:
    return storage.exists(storage.join(set_dir, META))


def read_meta(set_dir: str) -> dict[str, Any]:
    path = storage.join(set_dir, META)
    if not storage.exists(set_dir):
        raise RaysdError(f"image set {set_dir} does not exist")
    if not storage.exists(path):
        raise RaysdError(
            f"image set {set_dir} is incomplete: {META} is missing (an interrupted write?); "
            "rerun the command that writes it"
        )
    try:
        meta = storage.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise RaysdError(f"image set {set_dir}: {META} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SET_FORMAT or not isinstance(meta.get("files"), dict):
        raise RaysdError(f"image set {set_dir}: {META} is not a raysd set description (format {SET_FORMAT})")
    for name in meta["files"]:
        storage.check_member_name(name, f"image set {set_dir}: {META}")
    return meta


def read_shard(path: str, expected: dict | None = None) -> pa.Table:
    """Read one shard, verifying its SHA-256 and row count against ``expected`` when given."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise RaysdError(f"shard {path} is listed in {META} but missing") from None
    if expected is not None and storage.sha256_bytes(data) != expected.get("sha256"):
        raise RaysdError(f"shard {path} is damaged: its SHA-256 does not match {META} (truncated or altered)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # ArrowInvalid on corrupt Parquet
        raise RaysdError(f"shard {path} is not readable Parquet: {str(e).splitlines()[0]}") from None
    if expected is not None and table.num_rows != expected.get("rows"):
        raise RaysdError(f"shard {path} has {table.num_rows} rows, {META} says {expected.get('rows')}")
    return table


def verified_files(set_dir: str, meta: dict[str, Any] | None = None) -> list[str]:
    """Paths of the set's shards after checking each against its SHA-256 in ``meta.json``.

    For readers that hand the paths to another reader (Ray Data): nothing damaged is used.
    """
    meta = meta if meta is not None else read_meta(set_dir)
    paths = []
    for name, info in sorted(meta["files"].items()):
        storage.check_member_name(name, f"{set_dir}: {META}")
        path = storage.join(set_dir, name)
        if not storage.exists(path):
            raise RaysdError(f"shard {path} is listed in {META} but missing")
        if storage.sha256_file(path) != info.get("sha256"):
            raise RaysdError(f"shard {path} is damaged: its SHA-256 does not match {META} (truncated or altered); "
                             "`raysd verify` lists every damaged file")
        paths.append(path)
    return paths


def table_to_arrays(table: pa.Table, image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids, labels, images) from a shard table, whatever extension type it reads as."""
    images = tensor_array(table, "image").astype(np.uint8, copy=False).reshape((table.num_rows, *image_shape))
    sample_ids = table.column("sample_id").to_numpy().astype(np.int64)
    labels = table.column("label").to_numpy().astype(np.int64)
    return sample_ids, labels, images


def read_set(set_dir: str, *, verify: bool = True) -> ImageSet:
    """Load a complete set into memory, rows ordered by ``sample_id``."""
    meta = read_meta(set_dir)
    shape = tuple(meta["image_shape"])
    parts = []
    for name, info in sorted(meta["files"].items()):
        table = read_shard(storage.join(set_dir, name), info if verify else None)
        parts.append(table_to_arrays(table, shape))  # type: ignore[arg-type]
    if parts:
        sids = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        images = np.concatenate([p[2] for p in parts])
    else:
        sids = np.zeros(0, np.int64)
        labels = np.zeros(0, np.int64)
        images = np.zeros((0, *shape), np.uint8)
    order = np.argsort(sids, kind="stable")
    sids, labels, images = sids[order], labels[order], images[order]
    if len(np.unique(sids)) != len(sids):
        raise RaysdError(f"image set {set_dir}: duplicate sample_ids across shards")
    if len(sids) != meta.get("num_rows", len(sids)):
        raise RaysdError(f"image set {set_dir}: {len(sids)} rows, {META} says {meta['num_rows']}")
    return ImageSet(images=images, labels=labels, sample_ids=sids, meta=meta)


def first_per_class(set_dir: str, per_class: int, classes: int | None = None) -> list[np.ndarray]:
    """Up to ``per_class`` images of each class (the first by sample_id order within each shard),
    reading shards one at a time, verified, and only until every class has them: what a report
    shows of a set of any size, without loading the set."""
    meta = read_meta(set_dir)
    n_cls = int(meta["num_classes"]) if classes is None else classes
    shape = tuple(meta["image_shape"])
    got: list[list[np.ndarray]] = [[] for _ in range(n_cls)]
    for name, info in sorted(meta["files"].items()):
        _, labels, images = table_to_arrays(read_shard(storage.join(set_dir, name), info), shape)  # type: ignore[arg-type]
        for c in range(n_cls):
            need = per_class - len(got[c])
            if need > 0:
                got[c].extend(images[np.flatnonzero(labels == c)[:need]])
        if all(len(g) >= per_class for g in got):
            break
    return [np.stack(g) if g else np.zeros((0, *shape), np.uint8) for g in got]


def counts_per_class(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(int).tolist()


def set_meta(
    *,
    dataset: str,
    split: str,
    class_names: list[str],
    labels: np.ndarray,
    image_shape: tuple[int, int, int],
    files: dict[str, dict],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The ``meta.json`` body shared by real and synthetic sets."""
    return {
        "dataset": dataset,
        "split": split,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "image_shape": list(image_shape),
        "num_rows": int(len(labels)),
        "counts_per_class": counts_per_class(labels, len(class_names)),
        "files": files,
        "provenance": provenance,
    }
