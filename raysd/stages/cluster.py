"""Connecting to Ray: an existing cluster (``RAY_ADDRESS``, ``ray start``, ``ray job submit``)
or, when there is none, a local one started in-process; the device and the storage a cluster
implies for a run.
"""

from __future__ import annotations

import logging
import os
import time

import ray

from raysd.config import Config
from raysd.data import storage
from raysd.errors import RaysdError

log = logging.getLogger("raysd")

PREEMPTION_WATCHER_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; connect to a running cluster when there is one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS")
    env_vars = _storage_env()
    if address and address != "local":
        kwargs = {"address": address, **({"runtime_env": {"env_vars": env_vars}} if env_vars else {})}
    else:  # RAY_ADDRESS=local: always a fresh in-process cluster; unset: a `ray start` one if running
        if address == "local":
            kwargs["address"] = "local"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        # Without a dashboard (it would cost a process and memory here) Ray Train's placement
        # group cleaner cannot reach the State API and warns about it every second; in a cluster
        # that lives and dies with this driver there is nothing for it to clean up.
        # Nor can a node of it be preempted: Ray Train's preemption watcher (a process per training
        # stage, importing Ray Train while the workers start) has nothing to watch.
        env_vars.setdefault(PREEMPTION_WATCHER_VAR, os.environ.get(PREEMPTION_WATCHER_VAR, "0"))
        kwargs["runtime_env"] = {"worker_process_setup_hook": "raysd.stages.cluster.quiet_worker_logs",
                                 "env_vars": env_vars}
    # Ray's DataContext progress bars print on the driver; keep Ray's own INFO lines out.
    ray.init(logging_level=logging.WARNING, **kwargs)
    log.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")})


def _storage_env() -> dict[str, str]:
    """The object-store endpoint this driver uses, for every worker of its job (not inside a
    submitted job: its runtime env already sets what its workers see). Never credentials."""
    if storage.ENDPOINT_VAR not in os.environ or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return {}
    return {storage.ENDPOINT_VAR: os.environ[storage.ENDPOINT_VAR]}


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


def accelerators(cfg: Config) -> float:
    """Accelerators (``resources.accelerator``, GPU by default) in the cluster now."""
    return float(ray.cluster_resources().get(cfg.resources.accelerator, 0.0))


def worker_device(device: str) -> str:
    """The device a Ray worker runs on: CUDA only when the worker holds a GPU (a custom accelerator
    resource, such as the tests' stand-in, holds none: such a worker runs on its CPU)."""
    if device != "cuda":
        return device
    return "cuda" if ray.get_gpu_ids() else "cpu"


def node_memory() -> list[float]:
    """Ray's ``memory`` resource of each alive node, bytes (what workers' memory requests are scheduled against)."""
    return [float(n.get("Resources", {}).get("memory", 0.0)) for n in ray.nodes() if n.get("Alive")]


_CARD: dict[str, float | None] = {}


def accelerator_memory(cfg: Config) -> float | None:
    """Bytes of memory of one accelerator: ``resources.gpu_memory_gb``, else read once on a GPU node
    (None for a custom accelerator resource, whose memory raysd cannot read)."""
    r = cfg.resources
    if r.gpu_memory_gb:
        return r.gpu_memory_gb * 1024**3
    if r.accelerator != "GPU":
        return None
    if "GPU" not in _CARD:
        def card() -> float:
            import torch

            return float(torch.cuda.get_device_properties(0).total_memory)

        _CARD["GPU"] = ray.get(ray.remote(num_gpus=1, num_cpus=0)(card).remote())
        log.info("device: one GPU has %.1f GB of memory", _CARD["GPU"] / 1024**3)
    return _CARD["GPU"]


def accelerator_capacity(cfg: Config) -> int:
    """What the cluster has or can grow to: sizes pools and concurrency, not what happens to be up."""
    return max(int(accelerators(cfg)), cfg.resources.max_gpus or 0)


_RESOLVED: dict[tuple, str] = {}


def resolve_device(cfg: Config) -> str:
    """'cuda' or 'cpu', once per driver and setting, said in the log with the reason.

    ``cuda`` waits for accelerators (asking the autoscaler for them); ``auto`` takes CUDA when the
    cluster has accelerators when it is first asked, else the CPU, and says how to wait for them."""
    r = cfg.resources
    key = (r.device, r.accelerator, ray.get_runtime_context().get_job_id())
    if key in _RESOLVED:
        return _RESOLVED[key]
    have = accelerators(cfg)
    if r.device == "cpu":
        device, why = "cpu", "resources.device=cpu"
    elif r.device == "cuda":
        if have < 1:
            wait_for_accelerators(cfg, 1)
        device, why = "cuda", f"resources.device=cuda; the cluster has {accelerators(cfg):g} {r.accelerator}"
    elif have > 0:
        device, why = "cuda", f"resources.device=auto and the cluster has {have:g} {r.accelerator}"
    else:
        device, why = "cpu", (f"resources.device=auto and the cluster has no {r.accelerator} now; on a cluster that "
                              "adds GPU workers on demand set --set resources.device=cuda to wait for them")
    _RESOLVED[key] = device
    from raysd.core.precision import describe  # torch: only once a stage needs a device

    log.info("device: %s (%s); numerics here: %s (model.precision=%s; a worker on another kind of CPU decides "
             "for itself)", device, why, describe(cfg.model.precision, device), cfg.model.precision)
    return device


def wait_for_accelerators(cfg: Config, n: int) -> None:
    """Ask the autoscaler for ``n`` accelerators and wait until they joined (one line per 30 s)."""
    from ray.autoscaler.sdk import request_resources

    r = cfg.resources
    request_resources(bundles=[{r.accelerator: 1}] * n)
    t0 = time.monotonic()
    said = t0
    while accelerators(cfg) < n:
        waited = time.monotonic() - t0
        if waited > r.gpu_wait_seconds:
            raise RaysdError(f"resources.device=cuda: no {r.accelerator} joined the cluster within "
                             f"{r.gpu_wait_seconds:g} s (asked the autoscaler for {n}); check the cluster's GPU worker "
                             "types and max_workers, or raise resources.gpu_wait_seconds")
        if time.monotonic() - said >= 30:
            log.info("device: waiting for %d %s from the autoscaler (%.0fs of %gs)", n, r.accelerator, waited,
                     r.gpu_wait_seconds)
            said = time.monotonic()
        time.sleep(2)


def check_storage_for_cluster(cfg: Config) -> None:
    """A local run directory cannot be shared by workers on several nodes (now or once the
    autoscaler adds them)."""
    if storage.is_uri(cfg.run_dir) and not storage.is_local(cfg.run_dir):
        return
    nodes = num_nodes()
    grows = (cfg.resources.max_gpus or 0) > accelerators(cfg)
    if (nodes > 1 or grows) and not cfg.resources.shared_storage:
        what = f"the Ray cluster has {nodes} nodes" if nodes > 1 else "the cluster will add nodes (resources.max_gpus)"
        raise RaysdError(
            f"run_dir {cfg.run_dir} is a local path but {what}: workers on other nodes "
            "would write checkpoints and shards to their own disks. Use an s3:// or gs:// URI, or a shared "
            "filesystem mounted at the same path on every node and --set resources.shared_storage=true"
        )


def connect(cfg: Config) -> str:
    """Ray up, the run directory reachable from every node; returns the device the work uses."""
    storage.configure_endpoint(cfg.storage_endpoint)
    ensure_ray()
    check_storage_for_cluster(cfg)
    return resolve_device(cfg)
