"""Connecting to Ray: an existing cluster (``RAY_ADDRESS``, ``ray start``, ``ray job submit``)
or, when there is none, a local one started in-process. Only stage modules import this.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("raysd")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; connect to a running cluster when there is one."""
    import ray

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
    # Ray's DataContext progress bars print on the driver; keep Ray's own INFO lines out.
    ray.init(logging_level=logging.WARNING, **kwargs)
    log.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")})


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def num_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
