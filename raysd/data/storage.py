"""Paths that are local directories or ``s3://`` / ``gs://`` / ``file://`` URIs (pyarrow.fs).

Every write that must not be seen half-done goes through :func:`write_bytes_atomic`: the
bytes land under a temporary name in the same directory and are renamed into place (an atomic
``os.replace`` locally; on object stores the final object appears only once it is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import pyarrow.fs as pafs

from raysd.errors import RaysdError

TMP_MARK = ".tmp-"  # temporary names contain this; readers and listings skip them


def is_uri(path: str) -> bool:
    return "://" in str(path)


def is_local(path: str) -> bool:
    return not is_uri(path) or str(path).startswith("file://")


def local_path(path: str) -> str:
    """A plain filesystem path for local paths and ``file://`` URIs."""
    p = str(path)
    return p[len("file://"):] if p.startswith("file://") else p


def join(base: str, *parts: str) -> str:
    out = str(base)
    for p in parts:
        out = out.rstrip("/") + "/" + str(p).lstrip("/")
    return out


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if is_local(path):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(path))
    try:
        return pafs.FileSystem.from_uri(str(path))
    except Exception as e:  # ArrowInvalid, missing credentials, unknown scheme
        raise RaysdError(f"storage: cannot open {path}: {str(e).splitlines()[0]}") from None


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for ``path``; what Ray's storage options take."""
    return _fs(path)


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(local_path(path))
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def isdir(path: str) -> bool:
    if is_local(path):
        return os.path.isdir(local_path(path))
    fs, p = _fs(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(local_path(path), exist_ok=True)
    else:
        fs, p = _fs(path)
        fs.create_dir(p, recursive=True)


def listdir(path: str) -> list[str]:
    """Names directly under ``path`` (sorted, temporary names excluded); [] if absent."""
    if is_local(path):
        p = local_path(path)
        names = os.listdir(p) if os.path.isdir(p) else []
    else:
        fs, p = _fs(path)
        if fs.get_file_info(p).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
        names = [i.base_name for i in infos]
    return sorted(n for n in names if TMP_MARK not in n)


def read_bytes(path: str) -> bytes:
    if is_local(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def tmp_name(path: str) -> str:
    d, _, base = str(path).rstrip("/").rpartition("/")
    return f"{d}/{base}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}" if d else f"{base}{TMP_MARK}{uuid.uuid4().hex[:8]}"


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    tmp = tmp_name(path)
    if is_local(path):
        lp, lt = local_path(path), local_path(tmp)
        os.makedirs(os.path.dirname(os.path.abspath(lp)), exist_ok=True)
        with open(lt, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(lt, lp)
        return
    fs, p = _fs(path)
    _, t = _fs(tmp)
    with fs.open_output_stream(t) as f:
        f.write(data)
    fs.move(t, p)


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def rename(src: str, dst: str) -> None:
    """Move a file or directory; locally atomic (``os.replace``)."""
    if is_local(src):
        os.replace(local_path(src), local_path(dst))
    else:
        fs, s = _fs(src)
        _, d = _fs(dst)
        fs.move(s, d)


def remove(path: str) -> None:
    """Delete a file or a directory tree; absent is fine."""
    if is_local(path):
        p = local_path(path)
        if os.path.isdir(p) and not os.path.islink(p):
            import shutil

            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)
        return
    fs, p = _fs(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def check_member_name(name: str, where: str, *, nested: bool = False) -> str:
    """A file name read from a sidecar (meta.json, checkpoint.json) must stay inside its
    directory: no absolute paths, no '..', no separators unless ``nested`` (then relative)."""
    parts = name.replace("\\", "/").split("/")
    bad = (not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
           or (len(parts) > 1 and not nested) or "\x00" in name)
    if bad:
        from raysd.errors import RaysdError

        raise RaysdError(f"{where} lists the file name {name!r}, which would leave its directory; refused")
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    if is_local(path):
        h = hashlib.sha256()
        with open(local_path(path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return sha256_bytes(read_bytes(path))
