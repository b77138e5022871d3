"""``RUN/manifest.json``: each stage's status, the key of what it depended on, its outputs and
seconds; plus the provenance of the run (config hash, git sha, versions)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

from raysd.config import Config
from raysd.data import storage
from raysd.errors import RaysdError

MANIFEST = "manifest.json"


def read_manifest(run_dir: str) -> dict[str, Any]:
    """The manifest, or an empty one when the run has none yet; a damaged one is refused."""
    path = storage.join(run_dir, MANIFEST)
    if not storage.exists(path):
        return {"stages": {}}
    try:
        m = storage.read_json(path)
    except (ValueError, UnicodeDecodeError):
        raise RaysdError(f"run {run_dir}: {MANIFEST} is damaged (not valid JSON); restore it or use another run "
                         "directory") from None
    if not isinstance(m, dict) or not isinstance(m.get("stages"), dict):
        raise RaysdError(f"run {run_dir}: {MANIFEST} is not a raysd manifest (no \"stages\" mapping); restore it or "
                         "use another run directory")
    return m


def write_manifest(run_dir: str, manifest: dict[str, Any]) -> None:
    storage.write_json(storage.join(run_dir, MANIFEST), manifest)


def provenance(cfg: Config) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("raysd", "ray", "torch", "diffusers", "optuna", "pyarrow", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        sha = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        sha = None
    return {"config_hash": cfg.hash(), "git_sha": sha, "versions": versions, "python": platform.python_version(),
            "host": platform.node()}
