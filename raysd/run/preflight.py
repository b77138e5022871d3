"""Checks on the driver before any Ray work: the base model, the dataset, the run directory, free
disk for the checkpoints the config implies, and GPU memory when the device is CUDA. Each failure
is one line naming what is wrong and the fix; a run that passes starts its stages knowing they
have what they need. Also the out-of-memory line a stage's failure becomes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from raysd.config import Config
from raysd.core import memory
from raysd.data import storage
from raysd.data.models import BASE_META, resolve_base
from raysd.errors import RaysdError, find_raysd_error, is_out_of_memory

log = logging.getLogger("raysd")
HUB_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


def preflight(cfg: Config, *, prepared: bool = False) -> None:
    """Every check, in the order a run would meet them; raises RaysdError on the first failure."""
    check_run_dir(cfg.run_dir)
    if not prepared:
        check_dataset(cfg)
    check_base(cfg.model.base_model)
    check_disk(cfg)
    check_gpu_memory(cfg)


def check_run_dir(run_dir: str) -> None:
    if storage.isfile(run_dir):
        raise RaysdError(f"run directory {run_dir} is a file; give a directory (--out / --run)")
    probe = storage.join(run_dir, f".raysd-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(run_dir)
        storage.write_bytes(probe, b"ok")
        storage.remove(probe)
    except (OSError, RaysdError) as e:
        raise RaysdError(f"run directory {run_dir} is not writable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); choose another --out") from None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(spec))


def check_base(spec: str) -> None:
    """The base exists where the config says: built in, a raysd base, a diffusers directory, the HF cache."""
    if spec in ("tiny", "tiny-vae") or spec.startswith("random:"):
        return
    spec = resolve_base(spec)
    if storage.is_uri(spec):
        if not storage.exists(storage.join(spec, BASE_META)):
            raise RaysdError(f"base model {spec}: no {BASE_META} there (raysd reads bases on object stores that "
                             "raysd wrote); give a local diffusers directory or a hub id")
        return
    if _looks_like_path(spec):
        _check_local_base(Path(spec).expanduser())
        return
    _check_hub_base(spec)


def _check_local_base(d: Path) -> None:
    from raysd.data.models import verify_base_dir

    if not d.is_dir():
        raise RaysdError(f"base model {d}: no such directory; pass --base-model DIR of a diffusers model "
                         "(unet/, vae/, scheduler/, model_index.json) or a hub id")
    if (d / BASE_META).is_file():
        problems = verify_base_dir(d)
        if problems:
            raise RaysdError(f"base model {problems[0]}")
        return
    missing = [f for f in HUB_FILES if not (d / f).is_file()]
    if missing:
        raise RaysdError(f"base model {d}: missing {', '.join(missing)} (a diffusers directory needs unet/, vae/, "
                         "scheduler/ and model_index.json); download them with `hf download REPO --include 'unet/*' "
                         "'vae/*' 'scheduler/*' model_index.json --local-dir DIR`")


def _check_hub_base(repo: str) -> None:
    """A hub id: its snapshot in the Hugging Face cache, or (online) reachable."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = [try_to_load_from_cache(repo, f) for f in HUB_FILES]
    if all(isinstance(c, str) for c in cached):
        return
    fix = (f"where there is internet, run `hf download {repo} --include 'unet/*' 'vae/*' 'scheduler/*' "
           f"model_index.json --local-dir DIR` and pass --base-model DIR (or set HF_HOME to a cache that holds it)")
    if constants.HF_HUB_OFFLINE:
        raise RaysdError(f"base model {repo!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                         f"HF_HUB_OFFLINE is set; {fix}")
    try:
        hf_hub_download(repo, "unet/config.json", etag_timeout=10)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated model: all mean "not available"
        raise RaysdError(f"base model {repo!r} is not available: not in the Hugging Face cache and the hub could "
                         f"not be reached ({type(e).__name__}); {fix}") from None


def check_dataset(cfg: Config) -> None:
    """The raw dataset is where the loaders will look (or may be downloaded)."""
    from raysd.data.sources.cifar import CIFAR
    from raysd.data.sources.medmnist import MEDMNIST

    name, data_dir, download = cfg.dataset.name, cfg.dataset.data_dir, cfg.dataset.download
    if name.startswith(("npz:", "folder:")):
        path = Path(name.split(":", 1)[1]).expanduser()
        ok = path.is_file() if name.startswith("npz:") else path.is_dir()
        if not ok:
            raise RaysdError(f"dataset {name}: {path} does not exist")
        return
    if download or name == "digits":
        return
    if name in CIFAR:
        folder = Path(data_dir or "data").expanduser() / CIFAR[name]["folder"]
        present = folder.is_dir()
    elif name in MEDMNIST:
        from medmnist.info import DEFAULT_ROOT

        folder = Path(data_dir or DEFAULT_ROOT).expanduser() / f"{name}.npz"
        present = folder.is_file()
    else:
        return
    if not present:
        raise RaysdError(f"dataset {name}: {folder} not found (download disabled); put the files there or pass "
                         "--data-dir")


def model_sizes(cfg: Config) -> dict[str, int]:
    """Parameter counts of the base UNet and VAE and of the Class-Encoder, without loading weights
    (counted once per process and setting)."""
    m = cfg.model
    return dict(_model_sizes(m.base_model, m.resolution, m.hidden_dim, m.seq_len,
                             100 if cfg.dataset.name == "cifar100" else 10))


@functools.lru_cache(maxsize=8)
def _model_sizes(spec: str, resolution: int, hidden_dim: int, seq_len: int, classes: int) -> dict[str, int]:
    import torch

    from raysd.core.models import diffusion as dm

    with torch.device("meta"):
        if spec in ("tiny", "tiny-vae") or spec.startswith("random:") or spec.startswith("builtin:"):
            base = (dm.build_random(spec, resolution) if spec.startswith("random:") else
                    dm.build_tiny("tiny" if spec.startswith("builtin:") else spec, resolution))
            unet, vae = base.unet, base.vae
        else:
            unet, vae = _meta_modules(resolve_base(spec))
    count = (lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0)
    dim = unet.config.cross_attention_dim
    dim = int(dim[0] if isinstance(dim, (list, tuple)) else dim)
    encoder = classes * hidden_dim + hidden_dim + hidden_dim * seq_len * dim
    return {"unet": count(unet), "vae": count(vae), "encoder": encoder}


def _meta_modules(spec: str) -> tuple[Any, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    local = Path(spec).expanduser()
    try:
        unet_cfg = UNet2DConditionModel.load_config(str(local) if local.exists() else spec, subfolder="unet")
        vae_cfg = AutoencoderKL.load_config(str(local) if local.exists() else spec, subfolder="vae")
    except Exception:  # noqa: BLE001 - no vae (pixel space) or config unreachable: sizes unknown
        return UNet2DConditionModel(), None
    return UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg)


def stage_needs(cfg: Config, sizes: dict[str, int] | None = None) -> dict[str, memory.Need]:
    """Memory per worker of the stages that dominate: steps 1 and 3 (the paper's batch sizes)."""
    sizes = sizes or model_sizes(cfg)
    side = cfg.model.resolution // (8 if sizes["vae"] else 1)
    bf16 = cfg.resources.device != "cpu" and cfg.model.precision in ("auto", "bf16", "fp16")
    workers = {kind: cfg.resources.train_workers(kind, "cpu" if cfg.resources.device == "cpu" else "cuda")
               for kind in ("encoder", "unet")}
    return {kind: memory.training_need(
        kind, unet_params=sizes["unet"], encoder_params=sizes["encoder"], latent_side=side,
        batch=-(-step.global_batch_size // workers[kind]), bf16=bf16, checkpointing=step.gradient_checkpointing,
        optimizer=step.optimizer, frozen_bf16=cfg.model.frozen_dtype == "bf16" and cfg.resources.device != "cpu")
        for kind, step in (("encoder", cfg.encoder), ("unet", cfg.finetune))}


def check_gpu_memory(cfg: Config) -> None:
    if cfg.resources.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        log.info("preflight: the driver has no GPU; GPU memory is checked by the workers")
        return
    have = torch.cuda.get_device_properties(0).total_memory
    for need in stage_needs(cfg).values():
        if need.bytes > have:
            raise RaysdError(f"{need.stage} needs about {need.gb():.1f} GB of GPU memory per worker, the GPU has "
                             f"{have / memory.GB:.1f} GB; lower it with {need.lower}")


def check_disk(cfg: Config) -> None:
    """Free disk for the checkpoints of steps 1 and 3 (every epoch kept) and two optimizer states."""
    if not storage.is_local(cfg.run_dir):
        return
    sizes = model_sizes(cfg)
    width = {"fp32": 4, "bf16": 2}
    need = (cfg.encoder.epochs * sizes["encoder"] * width[cfg.encoder.checkpoint_dtype]
            + cfg.finetune.epochs * sizes["unet"] * width[cfg.finetune.checkpoint_dtype] + 2 * 8 * sizes["unet"])
    path = Path(storage.local_path(cfg.run_dir))
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if need > free:
        raise RaysdError(f"run directory {cfg.run_dir}: the checkpoints need about {need / memory.GB:.1f} GB, the "
                         f"disk has {free / memory.GB:.1f} GB free; free space, choose another --out, or set "
                         "finetune.checkpoint_dtype=bf16 (halves each UNet checkpoint)")


@contextlib.contextmanager
def oom_as_error(stage: str, cfg: Config) -> Iterator[None]:
    """A stage's out-of-memory failure (Ray's memory monitor, CUDA, an allocation) as one line."""
    try:
        yield
    except Exception as e:
        if find_raysd_error(e) is None and is_out_of_memory(e):
            raise out_of_memory(stage, cfg) from None
        raise


def out_of_memory(stage: str, cfg: Config) -> RaysdError:
    """The one line a stage's out-of-memory failure becomes: what it needed, what there was, what lowers it."""
    import psutil

    kind = {"train_encoder": "encoder", "finetune": "unet"}.get(stage)
    have = f"{psutil.virtual_memory().total / memory.GB:.1f} GB of host memory on this node"
    if kind is None:
        return RaysdError(f"{stage}: out of memory ({have}); lower --set sampling.batch_size or "
                          "search.num_images, or give the stage a machine with more memory")
    need = stage_needs(cfg)[kind]
    return RaysdError(f"{stage}: out of memory: it needs about {need.gb():.1f} GB per worker, there are {have}; "
                      f"lower it with {need.lower}")
