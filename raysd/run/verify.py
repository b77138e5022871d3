"""`raysd verify RUN_DIR`: check every file of a run against the checksum recorded beside it.

What is checked: every image set (``data/*``, ``synthetic/*``) and latent cache (``cache/*``)
against its ``meta.json``; every checkpoint (``checkpoints/*/epoch_*``) against its
``checkpoint.json`` and every resume state (``checkpoints/*/resume/epoch_*``) against its ``resume.json``; the pretrained base (``base/``) against ``raysd_base.json``; the searches'
cached trial images against their sidecar JSON; and that the run's JSON documents parse. Ray
Tune's own experiment state is Ray's to check and is left alone. A set or checkpoint without its
description (an interrupted write that a rerun completes) is listed as incomplete, not damaged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from raysd.data import storage
from raysd.errors import RaysdError

DOCUMENTS = ("config.json", "manifest.json", "results.json")


@dataclass
class Report:
    checked: int = 0
    damaged: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged


def _subdirs(path: str) -> list[str]:
    if not storage.isdir(path):
        return []
    return [n for n in storage.listdir(path) if storage.isdir(storage.join(path, n)) and storage.TMP_MARK not in n]


def _check_file(rep: Report, path: str, sha: str | None, listed_in: str) -> None:
    rep.checked += 1
    if not storage.exists(path):
        rep.damaged.append(f"{path}: missing (listed in {listed_in})")
    elif sha is None:
        rep.damaged.append(f"{path}: {listed_in} records no checksum for it")
    elif storage.sha256_file(path) != sha:
        rep.damaged.append(f"{path}: damaged (SHA-256 does not match {listed_in}: truncated or altered)")


def _member(rep: Report, directory: str, name: str, listed_in: str, nested: bool = False) -> str | None:
    """The path of a file a sidecar lists, or None (recorded as damage) when it would leave ``directory``."""
    try:
        storage.check_member_name(name, listed_in, nested=nested)
    except RaysdError:
        rep.checked += 1
        rep.damaged.append(f"{listed_in}: lists {name!r}, a name that leaves {directory} (refused, not read)")
        return None
    return storage.join(directory, name)


def _read_json(rep: Report, path: str) -> dict | None:
    rep.checked += 1
    try:
        obj = storage.read_json(path)
    except (ValueError, UnicodeDecodeError):
        rep.damaged.append(f"{path}: not valid JSON")
        return None
    if not isinstance(obj, dict):
        rep.damaged.append(f"{path}: not a JSON object")
        return None
    return obj


def _sidecar(rep: Report, directory: str, name: str, why_incomplete: str) -> tuple[str, dict] | None:
    """(path, content) of the sidecar JSON that lists ``directory``'s files; None when it is
    absent (recorded as incomplete) or unreadable (recorded as damaged)."""
    meta_path = storage.join(directory, name)
    if not storage.exists(meta_path):
        rep.incomplete.append(f"{directory}: no {name} ({why_incomplete})")
        return None
    meta = _read_json(rep, meta_path)
    return None if meta is None else (meta_path, meta)


def _check_listed(rep: Report, directory: str, files: dict, meta_path: str, *, nested: bool = False) -> None:
    """Every file ``files`` lists (name -> SHA-256) against its checksum."""
    for name, sha in sorted(files.items()):
        path = _member(rep, directory, name, meta_path, nested=nested)
        if path:
            _check_file(rep, path, sha, meta_path)


def _check_set(rep: Report, set_dir: str) -> None:
    found = _sidecar(rep, set_dir, "meta.json", "an interrupted write; the command that makes it completes it")
    if found is None:
        return
    meta_path, meta = found
    files = meta.get("files")
    if not isinstance(files, dict):
        rep.damaged.append(f"{meta_path}: lists no files")
        return
    _check_listed(rep, set_dir, {n: (i or {}).get("sha256") if isinstance(i, dict) else None for n, i in files.items()},
                  meta_path)


def _check_checkpoint(rep: Report, directory: str, record: str = "checkpoint.json") -> None:
    """An epoch's weights (checkpoint.json) or its resume state (resume.json)."""
    found = _sidecar(rep, directory, record, "half written when a run stopped; ignored by raysd")
    if found is None:
        return
    meta_path, meta = found
    names = meta.get("files") or {}
    if not names:
        rep.damaged.append(f"{meta_path}: lists no files")
    _check_listed(rep, directory, names, meta_path)


def _check_base(rep: Report, base: str) -> None:
    found = _sidecar(rep, base, "raysd_base.json", "the pretrain stage writes it last")
    if found is None:
        return
    meta_path, meta = found
    if not meta.get("files"):
        rep.damaged.append(f"{meta_path}: records no checksums (written by an older raysd; rerun the pretrain stage)")
    _check_listed(rep, base, meta.get("files") or {}, meta_path, nested=True)


def _check_trial_images(rep: Report, images_dir: str) -> None:
    for name in sorted(storage.listdir(images_dir)):
        if not name.endswith(".json"):
            continue
        info_path = storage.join(images_dir, name)
        info = _read_json(rep, info_path)
        if info is not None:
            _check_file(rep, info_path[: -len(".json")] + ".safetensors", info.get("sha256"), info_path)


def verify_run(run_dir: str) -> Report:
    if not storage.isdir(run_dir):
        raise RaysdError(f"verify: {run_dir} is not a directory")
    if not storage.exists(storage.join(run_dir, "config.json")) and not storage.isdir(storage.join(run_dir, "data")):
        raise RaysdError(f"verify: {run_dir} is not a raysd run directory (no config.json or data/)")
    rep = Report()
    for doc in DOCUMENTS:
        p = storage.join(run_dir, doc)
        if storage.exists(p):
            _read_json(rep, p)
    for group in ("data", "synthetic", "cache"):
        for name in _subdirs(storage.join(run_dir, group)):
            _check_set(rep, storage.join(run_dir, group, name))
    for kind in _subdirs(storage.join(run_dir, "checkpoints")):
        root = storage.join(run_dir, "checkpoints", kind)
        for name in _subdirs(root):
            if name.startswith("epoch_"):
                _check_checkpoint(rep, storage.join(root, name))
        for name in _subdirs(storage.join(root, "resume")):
            _check_checkpoint(rep, storage.join(root, "resume", name), "resume.json")
    if storage.isdir(storage.join(run_dir, "base")):
        _check_base(rep, storage.join(run_dir, "base"))
    for name in _subdirs(run_dir):
        if name.startswith("search_"):
            sdir = storage.join(run_dir, name)
            for doc in ("best.json", "importance.json", "search.json"):
                if storage.exists(storage.join(sdir, doc)):
                    _read_json(rep, storage.join(sdir, doc))
            if storage.isdir(storage.join(sdir, "images")):
                _check_trial_images(rep, storage.join(sdir, "images"))
    return rep


def format_report(run_dir: str, rep: Report) -> str:
    lines = [f"DAMAGED {d}" for d in rep.damaged] + [f"incomplete {i}" for i in rep.incomplete]
    verdict = "ok" if rep.ok else f"{len(rep.damaged)} damaged file(s)"
    lines.append(f"verify: {run_dir}: {rep.checked} file(s) checked, {verdict}"
                 + (f", {len(rep.incomplete)} incomplete item(s)" if rep.incomplete else ""))
    return "\n".join(lines)


def report_json(rep: Report) -> str:
    return json.dumps({"checked": rep.checked, "damaged": rep.damaged, "incomplete": rep.incomplete}, indent=2)
