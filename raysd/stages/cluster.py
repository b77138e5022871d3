"""Connecting to Ray: an existing cluster (``RAY_ADDRESS``, ``ray start``, ``ray job submit``)
or, when there is none, a local one started in-process; the device and the storage a cluster
implies for a run.
"""

from __future__ import annotations

import logging
import os

import ray

from raysd.config import Config
from raysd.data import storage
from raysd.errors import RaysdError

log = logging.getLogger("raysd")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; connect to a running cluster when there is one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        kwargs = {"address": address}
    else:  # RAY_ADDRESS=local: always a fresh in-process cluster; unset: a `ray start` one if running
        if address == "local":
            kwargs["address"] = "local"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        # Without a dashboard (it would cost a process and memory here) Ray Train's placement
        # group cleaner cannot reach the State API and warns about it every second; in a cluster
        # that lives and dies with this driver there is nothing for it to clean up.
        kwargs["runtime_env"] = {"worker_process_setup_hook": "raysd.stages.cluster.quiet_worker_logs"}
    # Ray's DataContext progress bars print on the driver; keep Ray's own INFO lines out.
    ray.init(logging_level=logging.WARNING, **kwargs)
    log.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")})


def quiet_worker_logs() -> None:
    """Worker setup hook of the in-process cluster (see ``ensure_ray``): raysd prints a line per
    epoch and trial itself, so Ray Train's per-report INFO lines are left out."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    for name in ("ray.train._internal.storage",):  # Tune's function trainables (Train V2: its LoggingConfig)
        logging.getLogger(name).setLevel(logging.WARNING)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def num_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def resolve_device(cfg: Config) -> str:
    """'cuda' or 'cpu' for the cluster: auto uses CUDA when Ray reports GPUs."""
    if cfg.resources.device != "auto":
        return cfg.resources.device
    return "cuda" if cluster_gpus() > 0 else "cpu"


def check_storage_for_cluster(cfg: Config) -> None:
    """A local run directory cannot be shared by workers on several nodes."""
    if storage.is_uri(cfg.run_dir) and not storage.is_local(cfg.run_dir):
        return
    nodes = num_nodes()
    if nodes > 1 and not cfg.resources.shared_storage:
        raise RaysdError(
            f"run_dir {cfg.run_dir} is a local path but the Ray cluster has {nodes} nodes: workers on other nodes "
            "would write checkpoints and shards to their own disks. Use an s3:// or gs:// URI, or a shared "
            "filesystem mounted at the same path on every node and --set resources.shared_storage=true"
        )


def connect(cfg: Config) -> str:
    """Ray up, the run directory reachable from every node; returns the device the work uses."""
    ensure_ray()
    check_storage_for_cluster(cfg)
    return resolve_device(cfg)
