"""Training checkpoints: safetensors + JSON, verified on read, never unpickled.

A checkpoint directory ``ROOT/epoch_NNN/`` (registered with Ray Train, never edited afterwards) holds

* ``model.safetensors``: the trained module's unwrapped ``state_dict`` (fp32, or bf16 to halve it);
* ``checkpoint.json``: epoch, loss, config hash, module description and the SHA-256 of the weights.

The state needed only to resume lives apart, in ``ROOT/resume/epoch_NNN/`` (``optimizer.safetensors``,
``optimizer.json`` with the LR schedule and step, ``resume.json`` last with their checksums and
the weights' SHA-256 it belongs to); only the newest two are kept (an SD UNet's optimizer state
is 6.9 GB per epoch). A checkpoint or resume state whose record is missing, unreadable or whose
files do not match their checksums is incomplete (a kill mid-write) and is ignored or refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors.torch import save_file

from raysd.data import storage
from raysd.errors import RaysdError

CKPT_JSON = "checkpoint.json"
MODEL_FILE = "model.safetensors"
RESUME = "resume"
RESUME_JSON = "resume.json"
OPT_FILE = "optimizer.safetensors"
OPT_JSON = "optimizer.json"
_EPOCH_RE = re.compile(r"^epoch_(\d{3,})$")


def epoch_dir(root: str, epoch: int) -> str:
    return storage.join(root, f"epoch_{epoch:03d}")


def _save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors as safetensors at ``path`` through a local file (safetensors writes it without
    a second copy in memory: an SD UNet's optimizer state is 6.9 GB); returns its SHA-256."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="raysd-tensors-", dir=tmp_root()) as tmp:
        local = os.path.join(tmp, "t.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, local)
        return storage.put_file(local, path)


def optimizer_to_files(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into tensors (safetensors) and plain JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in opt_state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val
            else:
                scalars[f"state.{idx}.{key}"] = val
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in list(tensors.items()) + list(js.get("scalars", {}).items()):
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": js["param_groups"]}


def write_checkpoint(directory: str, *, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                     dtype: str = "fp32") -> str:
    """Write weights and ``checkpoint.json`` (last) into ``directory``; returns the weights' SHA-256."""
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    sha = _save_tensors(storage.join(directory, MODEL_FILE),
                        {k: (v.to(cast) if v.is_floating_point() else v) for k, v in model_state.items()})
    storage.write_json(storage.join(directory, CKPT_JSON), {**meta, "weights_dtype": dtype, "files": {MODEL_FILE: sha}})
    return sha


def resume_dir(root: str, epoch: int) -> str:
    return storage.join(root, RESUME, f"epoch_{epoch:03d}")


def write_resume(root: str, epoch: int, *, optimizer_state: dict[str, Any], extra: dict[str, Any],
                 weights_sha: str, keep: int = 2) -> None:
    """The optimizer state and LR schedule after ``epoch`` (record last), then drop all but the newest ``keep``.

    Two are kept: while epoch N's weights are still uploading, epoch N-1's pair is the one to resume from."""
    d = resume_dir(root, epoch)
    tensors, js = optimizer_to_files(optimizer_state)
    text = json.dumps({**js, **extra}).encode()
    storage.write_bytes(storage.join(d, OPT_JSON), text)
    files = {OPT_FILE: _save_tensors(storage.join(d, OPT_FILE), tensors), OPT_JSON: storage.sha256_bytes(text)}
    storage.write_json(storage.join(d, RESUME_JSON), {"epoch": epoch, "weights_sha256": weights_sha, "files": files})
    recorded = _epochs_in(storage.join(root, RESUME), RESUME_JSON)
    older = [e for e in recorded if e <= epoch - keep]
    unfinished = [e for e in _epochs_in(storage.join(root, RESUME), None)
                  if e < epoch and e not in recorded]  # cut short before their record
    for e in older + unfinished:
        storage.remove(resume_dir(root, e))


def read_meta(directory: str) -> dict[str, Any]:
    path = storage.join(directory, CKPT_JSON)
    if not storage.exists(path):
        raise RaysdError(f"checkpoint {directory} is incomplete: {CKPT_JSON} is missing")
    try:
        meta = storage.read_json(path)
    except (ValueError, UnicodeDecodeError):
        raise RaysdError(f"checkpoint {directory}: {CKPT_JSON} is damaged (not valid JSON)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "epoch" not in meta:
        raise RaysdError(f"checkpoint {directory}: {CKPT_JSON} is not a raysd checkpoint description")
    for name in meta["files"]:
        storage.check_member_name(name, f"checkpoint {directory}: {CKPT_JSON}")
    return meta


def weights_sha(directory: str) -> str:
    """The SHA-256 of a checkpoint's weights as its record states it (nothing but the record is read)."""
    sha = read_meta(directory)["files"].get(MODEL_FILE)
    if not sha:
        raise RaysdError(f"checkpoint {directory}: {CKPT_JSON} lists no {MODEL_FILE}")
    return sha


def _listed(directory: str, name: str) -> str:
    """The path of a file the record lists; refused in one line when it is missing."""
    path = storage.join(directory, name)
    if not storage.exists(path):
        raise RaysdError(f"checkpoint {directory}: {name} is missing")
    return path


def _matches(directory: str, name: str, actual: str, sha: str) -> None:
    if actual != sha:
        raise RaysdError(f"checkpoint {directory}: {name} is damaged (SHA-256 mismatch: truncated or altered)")


def _read_verified(directory: str, name: str, sha: str) -> bytes:
    data = storage.read_bytes(_listed(directory, name))
    _matches(directory, name, storage.sha256_bytes(data), sha)
    return data


def _check_file(directory: str, name: str, sha: str) -> None:
    """A listed file exists and matches its checksum (hashed in chunks, never held whole)."""
    _matches(directory, name, storage.sha256_file(_listed(directory, name)), sha)


def _load_tensors(directory: str, name: str, sha: str) -> dict[str, torch.Tensor]:
    """Safetensors verified against ``sha``: hashed in chunks, then loaded from the file (memory
    mapped), so a 3.5 GB UNet costs its tensors once, not also a 3.5 GB bytes object."""
    from safetensors.torch import load_file

    with storage.local_copy(_listed(directory, name)) as local:
        _matches(directory, name, storage.sha256_file(local), sha)
        try:
            return load_file(local)
        except Exception as e:  # SafetensorError on a malformed header
            raise RaysdError(f"checkpoint {directory}: not a valid safetensors file ({e})") from None


def load_weights(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state_dict, meta) of a verified checkpoint."""
    meta = read_meta(directory)
    sha = meta["files"].get(MODEL_FILE)
    if sha is None:
        raise RaysdError(f"checkpoint {directory}: {CKPT_JSON} lists no {MODEL_FILE}")
    state = _load_tensors(directory, MODEL_FILE, sha)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, meta


def load_resume_state(root: str, epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state_dict, extra resume fields such as the LR schedule and step) after ``epoch``."""
    d = resume_dir(root, epoch)
    meta = _resume_meta(d)
    if meta is None:
        raise RaysdError(f"checkpoint {epoch_dir(root, epoch)}: no resume state in {d}")
    files = meta["files"]
    tensors = _load_tensors(d, OPT_FILE, files[OPT_FILE])
    js = json.loads(_read_verified(d, OPT_JSON, files[OPT_JSON]))
    return optimizer_from_files(tensors, js), {k: v for k, v in js.items() if k not in ("param_groups", "scalars")}


def _resume_meta(directory: str) -> dict[str, Any] | None:
    path = storage.join(directory, RESUME_JSON)
    try:
        meta = storage.read_json(path) if storage.exists(path) else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return None
    for name in meta["files"]:
        storage.check_member_name(name, f"resume state {directory}: {RESUME_JSON}")
    return meta


def is_valid(directory: str) -> bool:
    """True when the checkpoint is complete and its weights match their checksum."""
    try:
        meta = read_meta(directory)
        for name, sha in meta["files"].items():
            _check_file(directory, name, sha)
        return True
    except RaysdError:
        return False


def is_resumable(root: str, epoch: int) -> bool:
    """Valid weights of ``epoch`` and, beside them, the valid resume state made with those weights."""
    if not is_valid(epoch_dir(root, epoch)):
        return False
    meta = _resume_meta(resume_dir(root, epoch))
    if meta is None or meta.get("weights_sha256") != read_meta(epoch_dir(root, epoch))["files"].get(MODEL_FILE):
        return False
    try:
        for name, sha in meta["files"].items():
            _check_file(resume_dir(root, epoch), name, sha)
        return True
    except RaysdError:
        return False


def _epochs_in(root: str, record: str | None) -> list[int]:
    """Epoch directories under ``root`` holding ``record`` (None: every epoch directory)."""
    out = []
    for name in storage.listdir(root):
        m = _EPOCH_RE.match(name)
        if m and (record is None or storage.exists(storage.join(root, name, record))):
            out.append(int(m.group(1)))
    return sorted(out)


def list_epochs(root: str) -> list[int]:
    """Epoch numbers of directories under ``root`` that have a checkpoint.json (unverified)."""
    return _epochs_in(root, CKPT_JSON)


def recorded_epochs(root: str) -> dict[int, str]:
    """{epoch: its weights' SHA-256} of every checkpoint whose record is readable: what a search may
    use, from the records alone (the weights are verified where they are loaded)."""
    out = {}
    for e in list_epochs(root):
        try:
            out[e] = weights_sha(epoch_dir(root, e))
        except RaysdError:
            continue
    return out


def valid_epochs(root: str) -> list[int]:
    return [e for e in list_epochs(root) if is_valid(epoch_dir(root, e))]


def latest_resumable(root: str) -> int | None:
    for e in reversed(list_epochs(root)):
        if is_resumable(root, e):
            return e
    return None


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (to prove frozen weights unchanged)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tmp_root() -> str | None:
    """Where workers stage checkpoints before Ray uploads them (``RAYSD_TMPDIR``, else the system's)."""
    return os.environ.get("RAYSD_TMPDIR")


def local_tmpdir(prefix: str = "raysd-ckpt-") -> str:
    """A local staging directory named with this process's pid and start time (see :func:`sweep_tmpdirs`)."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=tmp_root())


def owner_tag() -> str:
    """'pid.start-time' of this process: names its staging directories, so a sweep knows their owner."""
    import psutil

    return f"{os.getpid()}.{int(psutil.Process().create_time())}"


_OWNED = re.compile(r"^raysd-[a-z]+-(\d+)\.(\d+)-")


def sweep_tmpdirs() -> list[str]:
    """Remove the staging directories (``raysd-ckpt-*``, ``raysd-trial-*``) of processes on this node
    that are gone (a worker killed between writing a checkpoint and Ray uploading it); returns them."""
    import shutil
    import tempfile

    import psutil

    root = tmp_root() or tempfile.gettempdir()
    gone = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _OWNED.match(name)
        if not m:
            continue
        pid, started = int(m.group(1)), int(m.group(2))
        try:
            alive = int(psutil.Process(pid).create_time()) == started
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            alive = False
        if not alive:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            gone.append(name)
    return gone
