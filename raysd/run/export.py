"""Export an image set for other tools: ImageFolder PNGs, a MedMNIST-style npz, or a Hugging
Face ``datasets`` Parquet dataset (image column = PNG bytes, the ``Image`` feature).

Files are written straight into ``--out`` and ``export.json`` last (no rename: object stores have
none), so an interrupted export is never taken for a finished one; rerunning the same export
finishes it. A finished or foreign ``--out`` is refused.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysd.config import fingerprint
from raysd.data import imageset
from raysd.data import storage
from raysd.errors import RaysdError
from raysd.run.rundir import claim

FORMATS = ("imagefolder", "npz", "hf")
HF_ROWS_PER_FILE = 50_000


def class_folder(index: int, name: str) -> str:
    """'003_immature_granulocytes' - the index keeps ImageFolder's sorted order = label order."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:60] or "class"
    return f"{index:03d}_{safe}"


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def export_set(set_dir: str, fmt: str, out: str) -> dict:
    if fmt not in FORMATS:
        raise RaysdError(f"export: --format must be one of {FORMATS}; got {fmt!r}")
    if storage.exists(storage.join(out, "export.json")) or storage.isfile(out):
        raise RaysdError(f"export: {out} already exists; choose a new --out")
    data = imageset.read_set(set_dir)
    tmp = out.rstrip("/")
    claim(tmp, fingerprint([set_dir, data.meta.get("files"), fmt]), what="export", fix="choose a new --out")
    names = data.class_names
    if fmt == "imagefolder":
        for i, name in enumerate(names):
            storage.makedirs(storage.join(tmp, class_folder(i, name)))
        for sid, label, img in zip(data.sample_ids, data.labels, data.images):
            storage.write_bytes(storage.join(tmp, class_folder(int(label), names[label]), f"{sid:08d}.png"), _png(img))
    elif fmt == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, train_images=data.images, train_labels=data.labels.reshape(-1, 1),
                            sample_ids=data.sample_ids, class_names=np.asarray(names))
        storage.write_bytes(storage.join(tmp, "data.npz"), buf.getvalue())
    else:
        _write_hf(data, tmp)
    storage.write_json(storage.join(tmp, "export.json"), {"format": fmt, "source": set_dir,  # last: complete
                                                          "num_rows": len(data), "class_names": names})
    return {"format": fmt, "out": out, "num_rows": len(data)}


def _write_hf(data: imageset.ImageSet, tmp: str) -> None:
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": data.class_names},
                "sample_id": {"dtype": "int64", "_type": "Value"}}
    schema = pa.schema(
        [pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
         pa.field("label", pa.int64()), pa.field("sample_id", pa.int64())],
        metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()},
    )
    n = len(data)
    parts = max(1, -(-n // HF_ROWS_PER_FILE))
    storage.makedirs(storage.join(tmp, "data"))
    for p in range(parts):
        sl = slice(p * HF_ROWS_PER_FILE, min(n, (p + 1) * HF_ROWS_PER_FILE))
        images = [{"bytes": _png(img), "path": f"{sid:08d}.png"} for sid, img in zip(data.sample_ids[sl], data.images[sl])]
        table = pa.Table.from_pydict({"image": images, "label": data.labels[sl].tolist(),
                                      "sample_id": data.sample_ids[sl].tolist()}, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(tmp, "data", f"train-{p:05d}-of-{parts:05d}.parquet"), buf.getvalue())
