"""Model files: base models from a hub id, a local diffusers directory or the Hugging Face cache
(or built with random weights offline), raysd-written base directories with their checksums,
TAESD decoders, and trained generators loaded from checkpoints (once per process).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from raysd.core.generator import Generator, GeneratorSpec, apply_fast_paths
from raysd.core.models.class_encoder import ClassEncoder
from raysd.core.models.diffusion import (RANDOM, TINY, BaseModel, NoiseSchedule, build_random, build_tiny,
                                         with_weights)
from raysd.core.precision import weights_dtype
from raysd.data import checkpoints as ck
from raysd.data import storage
from raysd.data.storage import check_member_name, sha256_file
from raysd.errors import RaysdError

BASE_META = "raysd_base.json"
BUILTIN = "builtin:"  # bases shipped in the package: builtin:NAME is raysd/data/bases/NAME
BUILTIN_DIR = Path(__file__).resolve().parent / "bases"


def resolve_base(spec: str) -> str:
    """A ``builtin:NAME`` base as the directory it is shipped in; any other spec as it is."""
    if not spec.startswith(BUILTIN):
        return spec
    path = BUILTIN_DIR / spec[len(BUILTIN):]
    if not (path / BASE_META).is_file():
        known = sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / BASE_META).is_file()) if BUILTIN_DIR.is_dir() else []
        raise RaysdError(f"base model {spec}: no such built-in base (shipped: {', '.join(known) or 'none'}); "
                         "rebuild it with `raysd pretrain-base` or reinstall raysd")
    return str(path)


def is_local_model_dir(spec: str) -> bool:
    return (Path(spec).expanduser() / "unet" / "config.json").is_file()


def load_base_model(spec: str, *, resolution: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", seed: int = 0,
                    schedule: NoiseSchedule | None = None, unet_state: dict[str, torch.Tensor] | None = None) -> BaseModel:
    """Load (or build, for ``tiny``) the base model; one clear error when it is unavailable.

    With ``schedule``, the base's own ``scheduler/scheduler_config.json`` (when it has one) must
    agree with it (betas, schedule, prediction type): a v-prediction base trained as epsilon would
    be silently wrong, so a mismatch is refused in one line naming the setting to change. With
    ``unet_state`` (a fine-tuned UNet) the base's own UNet weights are not loaded at all."""
    if spec in TINY:
        base = build_tiny(spec, resolution, seed)
        if unet_state is not None:
            base.unet.load_state_dict(unet_state)
        return base.to(device, dtype)
    if spec in RANDOM:
        return build_random(spec, resolution, seed, unet_state=unet_state).to(device, dtype)
    spec = resolve_base(spec)
    if storage.is_uri(spec):
        spec = fetch_base(spec)
    local = Path(spec).expanduser()
    if local.exists() and not is_local_model_dir(spec):
        raise RaysdError(f"base model {spec}: directory exists but has no unet/config.json "
                         "(expected a diffusers layout: unet/, vae/, scheduler/)")
    base = _load_diffusers(str(local) if local.exists() else spec, resolution, dtype, unet_state)
    if schedule is not None and base.scheduler_config:
        check_schedule(spec, base.scheduler_config, schedule)
    return base.to(device)


def check_schedule(spec: str, scheduler_config: dict[str, Any], schedule: NoiseSchedule) -> None:
    wrong = schedule.mismatch(scheduler_config)
    if wrong:
        theirs = ", ".join(f"{k}={scheduler_config[k]}" for k in wrong)
        raise RaysdError(f"base model {spec}: its scheduler config has {theirs}, the run's model settings differ; set "
                         + " ".join(f"--set model.{k}={scheduler_config[k]}" for k in wrong
                                    if k != "beta_schedule") + " (raysd trains and samples with scaled_linear betas)")


def _scheduler_config(spec: str, offline: bool) -> dict[str, Any] | None:
    """The base's ``scheduler/scheduler_config.json``, from its directory or the hub cache; None if it has none."""
    from diffusers import DDPMScheduler

    try:
        return dict(DDPMScheduler.load_config(spec, subfolder="scheduler", local_files_only=offline))
    except Exception:  # noqa: BLE001 - no scheduler folder: the run's settings stand
        return None


def _load_diffusers(spec: str, resolution: int, dtype: torch.dtype,
                    unet_state: dict[str, torch.Tensor] | None = None) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available

    is_dir = os.path.isdir(spec)
    lean = {"low_cpu_mem_usage": is_accelerate_available()}  # without accelerate: no warning per load
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if is_dir and (Path(spec) / BASE_META).is_file():  # written by raysd: its checksums are checked first
        problems = verify_base_dir(spec)
        if problems:
            raise RaysdError(f"base model {problems[0]}")
    try:
        if unet_state is None:
            unet = UNet2DConditionModel.from_pretrained(spec, subfolder="unet", torch_dtype=dtype,
                                                        local_files_only=offline, **lean)
        else:  # its architecture only: the fine-tuned weights take the place of the base's
            config = UNet2DConditionModel.load_config(spec, subfolder="unet", local_files_only=offline)
            unet = with_weights(lambda: UNet2DConditionModel.from_config(config), unet_state).to(dtype)
        vae = None
        if not is_dir or (Path(spec) / "vae" / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(spec, subfolder="vae", torch_dtype=dtype, local_files_only=offline,
                                                **lean)
    except Exception as e:  # OSError / EnvironmentError / hub HTTP and connection errors
        if is_dir:
            raise RaysdError(f"base model {spec}: cannot load the diffusers weights ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
        raise RaysdError(
            f"base model {spec!r} is not available: not in the local Hugging Face cache and the hub could not "
            f"be reached ({type(e).__name__}). Where there is internet, run `hf download {spec} --include "
            f"'unet/*' 'vae/*' 'scheduler/*' 'model_index.json' --local-dir DIR` and pass --base-model DIR "
            "(or set HF_HOME to a cache that holds it)"
        ) from None
    meta = Path(spec) / BASE_META
    if is_dir and meta.is_file():
        resolution = int(json.loads(meta.read_text()).get("resolution", resolution))
    return BaseModel(unet=unet, vae=vae, resolution=resolution, source=spec,
                     scheduler_config=_scheduler_config(spec, offline))


def load_tiny_decoder(spec: str, *, latent_channels: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", seed: int = 0) -> Any:
    """An ``AutoencoderTiny`` (TAESD) from a local directory or hub id, or ``random:taesd`` (a
    randomly initialised one of TAESD's shape, for tests); one clear error when unavailable."""
    from diffusers import AutoencoderTiny

    if spec == "random:taesd":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tae = AutoencoderTiny(latent_channels=latent_channels)
    else:
        local = Path(spec).expanduser()
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            tae = AutoencoderTiny.from_pretrained(str(local) if local.exists() else spec, torch_dtype=dtype,
                                                  local_files_only=offline)
        except Exception as e:  # OSError / hub errors
            raise RaysdError(f"tiny decoder {spec!r} is not available ({type(e).__name__}: {_first_line(e)}); "
                             "download it where there is internet (`hf download madebyollin/taesd --local-dir DIR`) "
                             "and set model.tiny_decoder=DIR") from None
    if tae.config.latent_channels != latent_channels:
        raise RaysdError(f"tiny decoder {spec}: {tae.config.latent_channels} latent channels, the base model's VAE "
                         f"has {latent_channels}")
    return tae.to(device, dtype).eval()


def save_base_model(base: BaseModel, directory: str | Path, schedule: NoiseSchedule | None = None,
                    extra: dict[str, Any] | None = None, weights_dtype: torch.dtype | None = None) -> None:
    """A diffusers directory (unet/, vae/, scheduler/) that :func:`load_base_model` reads back;
    ``weights_dtype`` stores the UNet's weights in that dtype (loading casts them back)."""
    d = Path(directory)
    unet = base.unet if weights_dtype is None else copy.deepcopy(base.unet).to(weights_dtype)
    unet.save_pretrained(d / "unet", safe_serialization=True)
    if base.vae is not None:
        base.vae.save_pretrained(d / "vae", safe_serialization=True)
    sched = (schedule or NoiseSchedule()).diffusers_config()
    (d / "scheduler").mkdir(parents=True, exist_ok=True)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **sched}, indent=2))
    files = {str(f.relative_to(d)): sha256_file(str(f)) for f in sorted(d.rglob("*")) if f.is_file() and f.name != BASE_META}
    (d / BASE_META).write_text(json.dumps({"resolution": base.resolution, "source": base.source, **(extra or {}),
                                           "files": files}, indent=2))


def publish_base(local_dir: str, dest: str) -> None:
    """Copy a base written locally to ``dest`` (any storage) file by file, its record last."""
    storage.remove(storage.join(dest, BASE_META))  # uncommitted while it changes
    storage.remove(dest)
    storage.upload_dir(local_dir, dest, skip=(BASE_META,))
    with open(os.path.join(local_dir, BASE_META), "rb") as f:
        storage.write_bytes(storage.join(dest, BASE_META), f.read())


def is_pixel_space(spec: str) -> bool:
    """Whether a base diffuses pixels (no VAE), known without loading it: the ``tiny`` kind, or a
    diffusers directory (local, builtin or a raysd base on an object store) without ``vae/``.
    Hub ids are taken as latent (Stable Diffusion); a wrong False only costs a model load."""
    if spec in TINY or spec in RANDOM:
        return spec == "tiny"
    path = resolve_base(spec)
    if storage.is_uri(path):
        record = storage.join(path, BASE_META)
        if not storage.exists(record):
            return False
        return not any(n.startswith("vae/") for n in (storage.read_json(record).get("files") or {}))
    return is_local_model_dir(path) and not (Path(path).expanduser() / "vae" / "config.json").is_file()


def base_identity(spec: str) -> str:
    """What a base's content is: the SHA-256 of its raysd record, or the spec of a hub id or builtin model."""
    record = storage.join(resolve_base(spec), BASE_META)
    return storage.sha256_file(record) if not spec.startswith(("tiny", "random:")) and storage.exists(record) else spec


def base_content(spec: str) -> str:
    """A base model's identity for stage keys: its content for a raysd-written base (wherever it
    lies), else the hub id, builtin name or path as given."""
    ident = base_identity(spec)
    return ident if ident == spec else f"raysd base sha256:{ident[:16]}"


def fetch_base(uri: str) -> str:
    """A raysd-written base on an object store, copied into a local cache (once per content) and
    verified there; returns the local directory diffusers loads."""
    record = storage.read_bytes(storage.join(uri, BASE_META))
    cache = Path(os.environ.get("RAYSD_CACHE", Path.home() / ".cache" / "raysd")) / "bases" / storage.sha256_bytes(record)
    if not (cache / BASE_META).is_file() or verify_base_dir(cache):
        names = list(json.loads(record).get("files") or {})
        for name in names:
            check_member_name(name, f"base model {uri}: {BASE_META}", nested=True)
        storage.download_dir(uri, str(cache), names)
        (cache / BASE_META).write_bytes(record)  # last: the local copy is complete
        problems = verify_base_dir(cache)
        if problems:
            raise RaysdError(f"base model {uri}: {problems[0]}")
    return str(cache)


def verify_base_dir(directory: str | Path) -> list[str]:
    """Check the files a raysd-written base directory lists; returns the problems found."""
    d = Path(directory)
    meta = json.loads((d / BASE_META).read_text())
    problems = []
    for rel, sha in (meta.get("files") or {}).items():
        check_member_name(rel, f"base model {d}: {BASE_META}", nested=True)
        f = d / rel
        if not f.is_file():
            problems.append(f"{f}: missing (listed in {BASE_META})")
        elif sha256_file(str(f)) != sha:
            problems.append(f"{f}: damaged (SHA-256 does not match {BASE_META})")
    return problems


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# --------------------------------------------------------------------------------------------
# Trained generators


def load_generator(spec: GeneratorSpec, device: str | torch.device) -> Generator:
    """The generator of ``spec`` on ``device``; models cached per process by ``spec.model_key()``."""
    base, encoder = _load_models(*spec.model_key(), str(device))
    return Generator(base, encoder, spec)


def release_generators() -> None:
    """Drop this process's cached generator (the driver after scoring one: an SD UNet it kept
    would hold gigabytes while the next stages' workers need them)."""
    import gc

    _load_models.cache_clear()
    gc.collect()


def load_class_encoder(directory: str) -> ClassEncoder:
    """A Class-Encoder from its verified checkpoint (its shape is recorded in checkpoint.json)."""
    state, meta = ck.load_weights(directory)
    info = meta.get("class_encoder")
    if not info:
        raise RaysdError(f"checkpoint {directory} does not describe a Class-Encoder")
    encoder = ClassEncoder(info["num_classes"], info["seq_len"], info["dim"], info["hidden_dim"], info["null_class"])
    encoder.load_state_dict(state)
    return encoder


@functools.lru_cache(maxsize=1)  # one generator per process: a reused Tune actor must not hold several SD copies
def _load_models(base: str, resolution: int, encoder_dir: str, unet_dir: str | None, precision: str, seed: int,
                 compile: bool, fuse_qkv: bool, tiny_decoder: str | None, device: str) -> tuple[BaseModel, ClassEncoder]:
    dtype = weights_dtype(precision, device)
    ustate, umeta = ck.load_weights(unet_dir) if unet_dir else (None, {})
    adapter = umeta.get("adapter")
    if adapter is not None and umeta.get("base_identity") != base_content(base):
        raise RaysdError(f"checkpoint {unet_dir}: a LoRA adapter of the base {umeta.get('base_identity')}, not of "
                         f"{base_content(base)}; sample it with the base it was fine-tuned on")
    # a fine-tuned UNet replaces the base's weights (never loaded beside them); an adapter merges into them
    model = load_base_model(base, resolution=resolution, dtype=torch.float32, device="cpu", seed=seed,
                            unet_state=None if adapter is not None else ustate)
    if adapter is not None:
        from raysd.core.lora import LoraSpec, merge_adapter

        merge_adapter(model.unet, LoraSpec.from_json(adapter), ustate)
    encoder = load_class_encoder(encoder_dir)
    if encoder.dim != model.cross_attention_dim:
        raise RaysdError(f"checkpoint {encoder_dir}: Class-Encoder dim {encoder.dim} does not match the base UNet's "
                         f"cross_attention_dim {model.cross_attention_dim}")
    del ustate
    model.unet.eval()
    model.to(device, dtype)
    if tiny_decoder:
        if model.vae is None:
            raise RaysdError("model.tiny_decoder: the base model works in pixel space (no VAE to replace)")
        model.tiny_decoder = load_tiny_decoder(tiny_decoder, latent_channels=model.vae.config.latent_channels,
                                               dtype=dtype, device=device, seed=seed)
    if not (torch.device(device).type == "cpu" and dtype == torch.bfloat16):
        # channels-last: +16 % UNet forward in fp32 on a 2-core CPU; in bf16 on the CPU it was 5-25 % slower
        model.unet.to(memory_format=torch.channels_last)
    apply_fast_paths(model, compile=compile, fuse_qkv=fuse_qkv)
    return model, encoder.to(device).eval()
