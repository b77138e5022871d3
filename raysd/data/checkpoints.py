"""Training checkpoints: safetensors + JSON, verified on read, never unpickled.

A checkpoint directory ``.../epoch_NNN/`` holds

* ``model.safetensors``: the trained module's unwrapped ``state_dict`` (fp32, or bf16 to halve it);
* ``optimizer.safetensors`` + ``optimizer.json``: optimizer tensors and hyper-parameters, LR
  schedule and step, needed only to resume (kept for the newest epoch only: an SD UNet's
  optimizer state is 6.9 GB per epoch);
* ``checkpoint.json``: epoch, loss, config hash, module description and the SHA-256 of every
  file above. A checkpoint whose JSON is missing, unreadable or whose files do not match their
  checksums is incomplete (a kill mid-write) and is ignored or refused, never used.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from raysd.data import storage
from raysd.errors import RaysdError

CKPT_JSON = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPT_FILE = "optimizer.safetensors"
OPT_JSON = "optimizer.json"
_EPOCH_RE = re.compile(r"^epoch_(\d{3,})$")


def epoch_dir(root: str, epoch: int) -> str:
    return storage.join(root, f"epoch_{epoch:03d}")


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


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
                     optimizer_state: dict[str, Any] | None = None, resume: dict[str, Any] | None = None,
                     dtype: str = "fp32") -> None:
    """Write a checkpoint into ``directory`` (a local temp dir that Ray uploads, or storage)."""
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    weights = {k: (v.to(cast) if v.is_floating_point() else v) for k, v in model_state.items()}
    files = {MODEL_FILE: _tensor_bytes(weights)}
    resume_files: dict[str, bytes] = {}
    if optimizer_state is not None:
        ot, oj = optimizer_to_files(optimizer_state)
        resume_files[OPT_FILE] = _tensor_bytes(ot)
        resume_files[OPT_JSON] = json.dumps({**oj, **(resume or {})}).encode()
    for name, data in {**files, **resume_files}.items():
        storage.write_bytes_atomic(storage.join(directory, name), data)
    body = {
        **meta,
        "weights_dtype": dtype,
        "files": {n: storage.sha256_bytes(d) for n, d in files.items()},
        "resume_files": {n: storage.sha256_bytes(d) for n, d in resume_files.items()},
    }
    storage.write_json_atomic(storage.join(directory, CKPT_JSON), body)  # last: marks it complete


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
    for name in [*meta["files"], *(meta.get("resume_files") or {})]:
        storage.check_member_name(name, f"checkpoint {directory}: {CKPT_JSON}")
    return meta


def _read_verified(directory: str, name: str, sha: str) -> bytes:
    path = storage.join(directory, name)
    if not storage.exists(path):
        raise RaysdError(f"checkpoint {directory}: {name} is missing")
    data = storage.read_bytes(path)
    if storage.sha256_bytes(data) != sha:
        raise RaysdError(f"checkpoint {directory}: {name} is damaged (SHA-256 mismatch: truncated or altered)")
    return data


def _safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as e:  # SafetensorError on a malformed header
        raise RaysdError(f"checkpoint {where}: not a valid safetensors file ({e})") from None


def load_weights(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state_dict, meta) of a verified checkpoint."""
    meta = read_meta(directory)
    sha = meta["files"].get(MODEL_FILE)
    if sha is None:
        raise RaysdError(f"checkpoint {directory}: {CKPT_JSON} lists no {MODEL_FILE}")
    state = _safetensors(_read_verified(directory, MODEL_FILE, sha), directory)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, meta


def load_resume_state(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state_dict, extra resume fields such as the LR schedule and step)."""
    meta = read_meta(directory)
    rf = meta.get("resume_files", {})
    if OPT_FILE not in rf or OPT_JSON not in rf:
        raise RaysdError(f"checkpoint {directory}: holds weights only (no optimizer state to resume from)")
    tensors = _safetensors(_read_verified(directory, OPT_FILE, rf[OPT_FILE]), directory)
    js = json.loads(_read_verified(directory, OPT_JSON, rf[OPT_JSON]))
    return optimizer_from_files(tensors, js), {k: v for k, v in js.items() if k not in ("param_groups", "scalars")}


def is_valid(directory: str, *, resumable: bool = False) -> bool:
    """True when the checkpoint is complete and every listed file matches its checksum."""
    try:
        meta = read_meta(directory)
        names = dict(meta["files"])
        if resumable:
            if not meta.get("resume_files"):
                return False
            names.update(meta["resume_files"])
        for name, sha in names.items():
            _read_verified(directory, name, sha)
        return True
    except RaysdError:
        return False


def list_epochs(root: str) -> list[int]:
    """Epoch numbers of directories under ``root`` that have a checkpoint.json (unverified)."""
    out = []
    for name in storage.listdir(root):
        m = _EPOCH_RE.match(name)
        if m and storage.exists(storage.join(root, name, CKPT_JSON)):
            out.append(int(m.group(1)))
    return sorted(out)


def valid_epochs(root: str) -> list[int]:
    return [e for e in list_epochs(root) if is_valid(epoch_dir(root, e))]


def latest_resumable(root: str) -> int | None:
    for e in reversed(list_epochs(root)):
        if is_valid(epoch_dir(root, e), resumable=True):
            return e
    return None


def drop_resume_files(directory: str) -> None:
    """Free the optimizer state of an older epoch (its weights stay for the searches)."""
    for name in (OPT_FILE, OPT_JSON):
        storage.remove(storage.join(directory, name))
    meta = read_meta(directory)
    if meta.get("resume_files"):
        meta["resume_files"] = {}
        storage.write_json_atomic(storage.join(directory, CKPT_JSON), meta)


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (to prove frozen weights unchanged)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def local_tmpdir(prefix: str = "raysd-ckpt-") -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("RAYSD_TMPDIR"))
