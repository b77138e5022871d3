"""Paths that are local directories or URIs of a pyarrow filesystem (``s3://``, ``gs://``, ``file://``).

Plain paths use the operating system directly; every URI goes through pyarrow for reading and
listing (``file://`` too, so the pyarrow path is the one tested locally), while writes to a local
disk, ``file://`` included, always take a temporary name and an atomic replace. Object stores do not move directories and
their only atomic unit is the object, so raysd never renames a directory: a set, checkpoint or
base is written file by file into its final place and committed by a record written last
(``meta.json``, ``checkpoint.json``, ``raysd_base.json``); readers ignore what no record lists,
and a rerun removes it. :func:`write_bytes` makes a single file appear whole: a temporary name
and ``os.replace`` locally, a single PUT on an object store (an object exists only complete).

An S3-compatible store other than AWS (MinIO, Ceph, a test server) is reached through the
standard ``AWS_ENDPOINT_URL`` variable (the ``storage_endpoint`` setting sets it, also for Ray's
workers); credentials come from the usual AWS variables or the node's role.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator

import pyarrow.fs as pafs

from raysd.errors import RaysdError

TMP_MARK = ".tmp-"  # temporary local names contain this; listings skip them
ENDPOINT_VAR = "AWS_ENDPOINT_URL"


def is_uri(path: str) -> bool:
    return "://" in str(path)


def is_local(path: str) -> bool:
    """On this machine's disk (a plain path or ``file://``): not shared with other nodes."""
    return not is_uri(path) or str(path).startswith("file://")


def _native(path: str) -> bool:
    return not is_uri(path)


def local_path(path: str) -> str:
    """A plain filesystem path for local paths and ``file://`` URIs."""
    p = str(path)
    return p[len("file://"):] if p.startswith("file://") else p


def join(base: str, *parts: str) -> str:
    out = str(base)
    for p in parts:
        out = out.rstrip("/") + "/" + str(p).lstrip("/")
    return out


def configure_endpoint(url: str | None) -> None:
    """Point ``s3://`` paths of this process (and the Ray workers it starts) at ``url``."""
    if url:
        os.environ[ENDPOINT_VAR] = url


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if str(path).startswith("file://"):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(path))
    try:
        return pafs.FileSystem.from_uri(str(path))
    except Exception as e:  # ArrowInvalid, missing credentials, unknown scheme
        raise RaysdError(f"storage: cannot open {path}: {str(e).splitlines()[0]}") from None


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for ``path``; what Ray's storage options take."""
    if _native(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return _fs(path)


def _info(path: str) -> pafs.FileInfo:
    fs, p = _fs(path)
    return fs.get_file_info(p)


def exists(path: str) -> bool:
    if _native(path):
        return os.path.exists(path)
    return _info(path).type != pafs.FileType.NotFound


def isdir(path: str) -> bool:
    if _native(path):
        return os.path.isdir(path)
    return _info(path).type == pafs.FileType.Directory


def isfile(path: str) -> bool:
    if _native(path):
        return os.path.isfile(path)
    return _info(path).type == pafs.FileType.File


def makedirs(path: str) -> None:
    """A directory (locally); object stores have none to make, their prefixes exist with their objects."""
    if _native(path):
        os.makedirs(path, exist_ok=True)
    elif is_local(path):
        fs, p = _fs(path)
        fs.create_dir(p, recursive=True)


def listdir(path: str) -> list[str]:
    """Names directly under ``path`` (sorted, temporary names excluded); [] if absent."""
    if _native(path):
        names = os.listdir(path) if os.path.isdir(path) else []
    else:
        fs, p = _fs(path)
        try:
            infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = [i.base_name for i in infos]
    return sorted(n for n in names if TMP_MARK not in n)


def walk_files(path: str) -> list[str]:
    """Every file under ``path``, as paths relative to it (sorted)."""
    if _native(path):
        return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    fs, p = _fs(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return sorted(i.path[len(p.rstrip("/")) + 1:] for i in infos if i.type == pafs.FileType.File)


def read_bytes(path: str) -> bytes:
    if _native(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it: a temporary
    name and an atomic replace on a local disk (``file://`` too); one PUT on an object store (no
    copy, no delete)."""
    if is_local(path):
        path = local_path(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, p = _fs(path)
    with fs.open_output_stream(p) as f:
        f.write(data)


write_bytes = write_bytes  # the name the checkpoint and set writers have always used


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


write_json = write_json


def put_file(local_file: str, dest: str, chunk: int = 64 << 20) -> str:
    """Copy a local file to ``dest`` in chunks (a model's weights never need to fit in memory
    twice); returns its SHA-256. Locally (``file://`` too): a copy under a temporary name, then the
    atomic replace."""
    h = hashlib.sha256()
    if is_local(dest):
        dest = local_path(dest)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        tmp = f"{dest}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(local_file, "rb") as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(chunk), b""):
                h.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        return h.hexdigest()
    fs, p = _fs(dest)
    with open(local_file, "rb") as src, fs.open_output_stream(p) as out:
        for block in iter(lambda: src.read(chunk), b""):
            h.update(block)
            out.write(block)
    return h.hexdigest()


def upload_dir(local_dir: str, dest: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every file of a local directory to ``dest`` (file by file; ``skip`` names left out);
    returns the relative names copied. The caller commits the result with a record written last."""
    names = [n for n in walk_files(local_dir) if os.path.basename(n) not in skip]
    for name in names:
        put_file(os.path.join(local_dir, name), join(dest, name))
    return names


def download_dir(src: str, local_dir: str, names: list[str]) -> None:
    """Copy the listed files of ``src`` into a local directory."""
    for name in names:
        target = os.path.join(local_dir, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(read_bytes(join(src, name)))


def remove(path: str) -> None:
    """Delete a file or a directory tree; absent is fine."""
    if _native(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, p = _fs(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def remove_unlisted(directory: str, keep: set[str]) -> list[str]:
    """Delete the files directly under ``directory`` that ``keep`` does not name (the leftovers of
    an interrupted write, never committed by a record); returns what was removed."""
    gone = [n for n in listdir(directory) if n not in keep and isfile(join(directory, n))]
    for name in gone:
        remove(join(directory, name))
    return gone


def check_member_name(name: str, where: str, *, nested: bool = False) -> str:
    """A file name read from a sidecar (meta.json, checkpoint.json) must stay inside its
    directory: no absolute paths, no '..', no separators unless ``nested`` (then relative)."""
    parts = name.replace("\\", "/").split("/")
    bad = (not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
           or (len(parts) > 1 and not nested) or "\x00" in name)
    if bad:
        raise RaysdError(f"{where} lists the file name {name!r}, which would leave its directory; refused")
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file read in chunks (a 3.5 GB checkpoint is never held whole)."""
    h = hashlib.sha256()
    if _native(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        return h.hexdigest()
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def local_copy(path: str, chunk: int = 64 << 20) -> Iterator[str]:
    """A local path holding the file at ``path``: the file itself on a local disk, else a temporary
    download (copied in chunks, removed afterwards)."""
    if is_local(path):
        yield local_path(path)
        return
    import tempfile

    fs, p = _fs(path)
    with tempfile.TemporaryDirectory(prefix="raysd-fetch-") as tmp:
        local = os.path.join(tmp, os.path.basename(p))
        with fs.open_input_stream(p) as src, open(local, "wb") as out:
            for block in iter(lambda: src.read(chunk), b""):
                out.write(block)
        yield local
