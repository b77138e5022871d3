"""One typed configuration for every stage, with presets as data.

``Config`` is a tree of dataclasses. A preset is a flat mapping of dotted keys to values
applied over the defaults (the defaults are the paper's settings, DESIGN.md section 1).
Overrides (``--set section.field=value`` on the CLI, or a YAML/JSON file) are coerced to the
field's declared type; unknown keys and out-of-range values fail with one clear line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raysd.errors import RaysdError

# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class DatasetConfig:
    """Which real dataset: a registered name, ``npz:PATH`` or ``folder:PATH``."""

    name: str = "cifar10"  # registered name (cifar10, cifar100, pathmnist, dermamnist, bloodmnist, retinamnist, digits), npz:PATH or folder:PATH
    data_dir: str | None = None  # where the raw files live (torchvision / medmnist layout)
    download: bool = True  # fetch through torchvision / medmnist when absent (needs internet)


@dataclass
class ModelConfig:
    """The base diffusion model and the Class-Encoder built on it."""

    # A diffusers hub id, a local diffusers directory (unet/, vae/, scheduler/), or "tiny" /
    # "tiny-vae" for the built-in random-init test models.
    base_model: str = "stabilityai/stable-diffusion-2-base"  # hub id or local diffusers directory; tiny / tiny-vae / random:sd2-base / random:sd-v1 build random models offline
    seq_len: int = 77  # L, the context length the Class-Encoder emits (SD2: 77; released code: 100)
    resolution: int = 128  # px fed to SD: 32/28 px images upsampled to this (16x16 latents)
    hidden_dim: int = 500  # Class-Encoder's hidden width (paper: 500)
    null_class: bool = False  # learned null class + label dropout (CFG training, not in the paper)
    label_dropout: float = 0.1  # probability of the null class while training, when null_class
    # Noise schedule of the DDPM objective (SD's): scaled_linear betas over 1000 steps.
    beta_start: float = 0.00085  # scaled_linear noise schedule start
    beta_end: float = 0.012  # scaled_linear noise schedule end
    num_train_timesteps: int = 1000  # diffusion training timesteps T
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    tiny_decoder: str | None = None  # AutoencoderTiny (TAESD) hub id or directory decoding instead of the VAE; CAS effect unmeasured
    # Offline demo only: unconditional pretraining of a tiny base, standing in for SD's.
    pretrain_steps: int = 0  # unconditional pretraining steps of a randomly initialised base (demo only; 0 = use the weights as loaded)
    pretrain_batch_size: int = 64  # batch of that pretraining
    pretrain_lr: float = 1e-3  # learning rate of that pretraining


@dataclass
class TrainStepConfig:
    """Step 1 (Class-Encoder) or step 3 (UNet fine-tuning): AdamW + cosine decay per step."""

    epochs: int = 50  # epochs; one checkpoint per epoch, all kept for the searches
    global_batch_size: int = 64  # images per optimizer step, split across workers
    lr: float = 1e-4  # peak learning rate, cosine-decayed to 0 per step
    weight_decay: float = 4e-3  # decoupled (AdamW)
    grad_clip_norm: float = 10.0  # global norm
    steps_per_epoch: int | None = None  # None: one pass over the train split; N: exactly N steps (data cycled)
    checkpoint_dtype: Literal["fp32", "bf16"] = "fp32"  # dtype of the saved weights (bf16 halves a UNet checkpoint)


@dataclass
class SamplingConfig:
    """Defaults of the guided sampler (the searches override IS and UGS)."""

    scheduler: Literal["ddim", "dpmpp", "unipc"] = "ddim"  # ddim (eta 0, the released code), DPM-Solver++ or UniPC
    num_inference_steps: int = 50  # IS; for ddim the released code's spacing (IS=31 -> 32 steps)
    guidance_scale: float = 7.5  # UGS
    batch_size: int = 256  # images per sampler call; split further on CPU memory limits
    compile: bool = False  # torch.compile the UNet and VAE decoder (static shapes: batches padded to batch_size)
    fuse_qkv: bool = False  # fuse the attention Q/K/V projections into one matmul (diffusers)


@dataclass
class CasConfig:
    """ResNet20 CAS protocol of the paper's released code."""

    variant: Literal["paper", "standard"] = "paper"  # paper: the released code's wide ResNet20 (4.29 M params); standard: He et al.'s (0.27 M)
    max_epochs: int = 100  # epoch limit (also the search schedulers' max_t)
    batch_size: int = 256  # training batch
    min_steps_per_epoch: int = 0  # > 0: smaller batches for small sets (batch <= N / this); 0: batch_size always
    lr: float = 1e-3  # Adam learning rate
    eps: float = 1e-7  # Keras' Adam epsilon
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    plateau_factor: float = 0.1  # ReduceLROnPlateau factor (on val loss)
    plateau_patience: int = 10  # ReduceLROnPlateau patience, epochs
    min_lr: float = 1e-5  # ReduceLROnPlateau floor
    early_stopping_patience: int = 25  # epochs without val improvement before stopping (best weights restored)
    eval_batch_size: int = 1024  # batch for val/test evaluation
    compile: bool = False  # torch.compile the classifier (worth it on a GPU for the 100-epoch protocol)


@dataclass
class SearchConfig:
    """Steps 2 and 4: TPE + Hyperband over IS, UGS and the checkpoint epoch."""

    num_trials: int = 50  # trials per search phase
    num_images: int = 4000  # generated per trial, class-balanced
    scheduler: Literal["hyperband", "asha"] = "hyperband"  # trial scheduler; time unit = classifier epoch
    objective: Literal["val", "test"] = "val"  # "test" reproduces the paper (leaks the test set)
    min_inference_steps: int = 5  # lower bound of IS (inclusive)
    max_inference_steps: int = 50  # upper bound of IS in phase 1 (phase 2: IS*)
    max_guidance_scale: float = 7.5  # upper bound of UGS in phase 1 (phase 2: 2 UGS*)
    reduction_factor: int = 3  # HyperBand/ASHA eta
    grace_period: int = 1  # ASHA: epochs before a trial may be stopped
    max_concurrent_trials: int | None = None  # None: as many as the resources allow


@dataclass
class ScaleConfig:
    """Step 5: datasets of k times the real training-set size."""

    scales: list[int] = field(default_factory=lambda: list(range(1, 11)))  # k of the x1..xK datasets; the largest is generated, the others are stratified prefixes
    class_balance: Literal["real", "uniform"] = "real"  # per-class counts: the real train split's proportions or uniform
    shard_size: int = 1024  # sample_ids per Parquet shard (the unit of resumption)
    keep_full_resolution: bool = False  # also store the 128 px images


@dataclass
class ResourcesConfig:
    """Where work runs. ``device="auto"`` uses CUDA when the cluster has GPUs."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when the cluster has GPUs
    num_workers: int = 1  # Ray Train workers (data parallel)
    gpus_per_worker: float = 1.0  # GPUs per Ray Train worker
    cpus_per_worker: float = 1.0  # CPUs per Ray Train worker
    torch_threads: int | None = None  # CPU threads per worker/trial; None: its CPU reservation
    gpus_per_trial: float = 1.0  # Ray Tune trial resources; fractional GPUs allowed
    cpus_per_trial: float = 1.0  # CPUs per Ray Tune trial
    generation_actors: int | None = None  # max size of the generation actor pool; None: all GPUs
    max_failures: int = 3  # Ray Train / Tune retries of a failed worker or trial (from its checkpoint)
    shared_storage: bool = False  # a local run_dir is on a filesystem every node mounts at that path


@dataclass
class Config:
    """The whole run. Build with :func:`load_config`, not by hand."""

    preset: Literal["demo", "paper", "official"] = "paper"  # the preset these values started from
    seed: int = 0  # run seed: data order, per-sample generation seeds, classifier init, searches
    run_dir: str = "runs/raysd"  # run directory: local path or URI (s3://, gs://) shared by all nodes
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: TrainStepConfig = field(default_factory=TrainStepConfig)  # step 1
    finetune: TrainStepConfig = field(
        default_factory=lambda: TrainStepConfig(epochs=10, global_batch_size=16, lr=1e-5)
    )  # step 3
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    cas: CasConfig = field(default_factory=CasConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Stable hash of the whole config, or of the named top-level sections only."""
        d = self.to_dict()
        if sections:
            d = {k: d[k] for k in sections}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Presets (data). Keys are dotted paths into Config.

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's text: SD 2.0 (base, 512 px training, epsilon prediction), 77-token context.
    "paper": {},
    # The released code: an SD v1.x UNet with a (100, 768) context.
    "official": {
        "model.base_model": "CompVis/stable-diffusion-v1-4",
        "model.seq_len": 100,
    },
    # Offline demo on this 2-core CPU machine: digits, a tiny pixel-space model pretrained
    # briefly, every stage with small budgets (DESIGN.md section 5b).
    "demo": {
        "dataset.name": "digits",
        "model.base_model": "tiny",
        "model.seq_len": 4,
        "model.resolution": 16,
        "model.null_class": True,  # CFG training: measured +5-10 points of CAS on this tiny model
        "model.label_dropout": 0.1,
        "model.pretrain_steps": 240,
        "model.pretrain_batch_size": 64,
        "model.pretrain_lr": 2e-3,
        "encoder.epochs": 2,
        "encoder.global_batch_size": 64,
        "encoder.lr": 1e-2,
        "encoder.steps_per_epoch": 32,
        "finetune.epochs": 7,
        "finetune.global_batch_size": 64,
        "finetune.lr": 2e-3,
        "finetune.steps_per_epoch": 48,
        "sampling.num_inference_steps": 10,
        "sampling.guidance_scale": 2.0,
        "sampling.batch_size": 512,
        "cas.variant": "standard",
        "cas.max_epochs": 8,
        "cas.batch_size": 128,
        "cas.min_steps_per_epoch": 10,  # the 300-image search sets train with batches of 30
        "cas.plateau_patience": 3,
        "cas.early_stopping_patience": 5,
        "search.num_trials": 3,
        "search.num_images": 300,
        "search.min_inference_steps": 4,
        "search.max_inference_steps": 6,
        "search.max_guidance_scale": 3.0,
        "scale.scales": [1, 2, 3],
        "scale.shard_size": 512,
        "resources.device": "cpu",
        "resources.cpus_per_trial": 1.0,
        "resources.gpus_per_trial": 0.0,
        "resources.gpus_per_worker": 0.0,
        "resources.torch_threads": 2,  # one worker uses both cores; its reservation stays 1 CPU for Ray Data
    },
}

REGISTERED_DATASETS = (
    "cifar10",
    "cifar100",
    "pathmnist",
    "dermamnist",
    "bloodmnist",
    "retinamnist",
    "digits",
)


# --------------------------------------------------------------------------------------------
# Building, overriding, validating


def load_config(
    preset: str = "paper",
    *,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    absolute_paths: bool = True,
) -> Config:
    """Defaults, then the preset, then a YAML/JSON file, then ``overrides``; validated.

    A file may be either nested (``{"encoder": {"epochs": 3}}``) or flat dotted keys; a saved
    ``config.json`` of a run loads back to an equal Config. Local paths (run directory, base
    model directory, tiny decoder, npz:/folder: datasets, data_dir) are made absolute: Ray's
    workers do not share the driver's working directory.
    """
    if preset not in PRESETS:
        raise RaysdError(f"config: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = Config(preset=preset)  # type: ignore[arg-type]
    apply_overrides(cfg, PRESETS[preset], source=f"preset {preset}")
    if file is not None:
        data = read_config_file(file)
        if "preset" in data and data["preset"] != preset:
            # A saved config carries its preset: start again from that one.
            return load_config(data["preset"], file=file, overrides=overrides, absolute_paths=absolute_paths)
        apply_overrides(cfg, flatten(data), source=str(file))
    apply_overrides(cfg, overrides or {}, source="overrides")
    if absolute_paths:
        absolutize_paths(cfg)
    validate(cfg)
    return cfg


def _is_uri(path: str) -> bool:
    return "://" in path


def absolutize_paths(cfg: Config) -> Config:
    """Make the config's local paths absolute (in place); URIs, hub ids and builtins stay."""
    import os

    def local(p: str) -> str:
        return p if _is_uri(p) or os.path.isabs(p) else os.path.abspath(os.path.expanduser(p))

    if cfg.run_dir.strip():
        cfg.run_dir = local(cfg.run_dir)
    for attr in ("base_model", "tiny_decoder"):
        v = getattr(cfg.model, attr)
        if v and not v.startswith(("tiny", "random:")) and not _is_uri(v) and os.path.exists(os.path.expanduser(v)):
            setattr(cfg.model, attr, local(v))  # a local directory (a hub id is no path here)
    name = cfg.dataset.name
    for prefix in ("npz:", "folder:"):
        if name.startswith(prefix) and name[len(prefix):]:
            cfg.dataset.name = prefix + local(name[len(prefix):])
    if cfg.dataset.data_dir:
        cfg.dataset.data_dir = local(cfg.dataset.data_dir)
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RaysdError(f"config: file {p} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RaysdError(f"config: {p} is not a readable text file ({type(e).__name__})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RaysdError(f"config: {p} is not valid {p.suffix.lstrip('.').upper() or 'JSON'}: {first}") from None
    if not isinstance(data, dict):
        raise RaysdError(f"config: {p} must hold a mapping of settings, not {type(data).__name__}")
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as JSON or YAML (by suffix)."""
    p = Path(path)
    d = cfg.to_dict()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(d, sort_keys=False))
    else:
        p.write_text(json.dumps(d, indent=2) + "\n")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; leaves dotted keys as they are."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any], *, source: str = "overrides") -> None:
    """Set dotted keys on ``cfg`` in place, coercing each value to its field's type."""
    for key, value in overrides.items():
        obj: Any = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or part not in _field_types(type(obj)):
                raise RaysdError(f"config: unknown key {key!r} (from {source}); {_known_keys_hint(key)}")
            obj = getattr(obj, part)
        name = parts[-1]
        types_ = _field_types(type(obj)) if dataclasses.is_dataclass(obj) else {}
        if name not in types_ or dataclasses.is_dataclass(getattr(obj, name)):
            raise RaysdError(f"config: unknown key {key!r} (from {source}); {_known_keys_hint(key)}")
        setattr(obj, name, coerce(value, types_[name], key))


def parse_set_flags(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` (the CLI's ``--set``) -> {"a.b": "1"}; values coerced later."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RaysdError(f"--set {item!r}: expected KEY=VALUE, e.g. --set encoder.epochs=3")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def all_keys(cfg: Config | None = None) -> list[tuple[str, Any, str]]:
    """Every dotted key with its default and type name (the README's configuration reference)."""
    cfg = cfg or Config()
    rows: list[tuple[str, Any, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                rows.append((prefix + f.name, v, _type_name(_field_types(type(obj))[f.name])))

    walk(cfg, "")
    return rows


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _known_keys_hint(key: str) -> str:
    section = key.split(".")[0]
    keys = [k for k, _, _ in all_keys() if k.startswith(section + ".")]
    if keys:
        return "known keys in this section: " + ", ".join(keys)
    return "sections: " + ", ".join(f.name for f in dataclasses.fields(Config))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a Python value or a CLI string) to type ``tp`` or fail clearly."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = RaysdError(f"config: {key} must be {_type_name(tp)}; got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except RaysdError:
                pass
        raise bad
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise RaysdError(f"config: {key} must be one of {list(args)}; got {value!r}")
    if origin is list:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            value = [v for v in (s.strip() for s in text.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(v, args[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if out != out or out in (float("inf"), float("-inf")):
            raise RaysdError(f"config: {key} must be a finite number; got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad  # pragma: no cover - a field type this coercer does not know


# --------------------------------------------------------------------------------------------
# Validation: one rule per line, each error names the key, the value, the rule and the fix.


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise RaysdError(f"config: {key} must be {rule}; got {value!r} (set it with --set {key}=...)")


def validate(cfg: Config) -> None:
    """Reject impossible settings up front, before any work starts."""
    name = cfg.dataset.name
    if not (name in REGISTERED_DATASETS or name.startswith(("npz:", "folder:"))):
        raise RaysdError(
            f"config: unknown dataset {name!r}; choose one of {', '.join(REGISTERED_DATASETS)}, "
            "or npz:PATH / folder:PATH for your own images"
        )
    m = cfg.model
    _check(bool(m.base_model.strip()), "model.base_model", m.base_model, "a hub id, a directory or 'tiny'")
    _check(1 <= m.seq_len <= 1024, "model.seq_len", m.seq_len, "in [1, 1024]")
    _check(8 <= m.resolution <= 1024 and m.resolution % 8 == 0, "model.resolution", m.resolution,
           "a multiple of 8 in [8, 1024]")
    _check(m.hidden_dim >= 1, "model.hidden_dim", m.hidden_dim, ">= 1")
    _check(0.0 <= m.label_dropout < 1.0, "model.label_dropout", m.label_dropout, "in [0, 1)")
    _check(0.0 < m.beta_start < 1.0, "model.beta_start", m.beta_start, "in (0, 1)")
    _check(m.beta_start < m.beta_end < 1.0, "model.beta_end", m.beta_end, f"in (model.beta_start={m.beta_start:g}, 1)")
    _check(m.num_train_timesteps >= 2, "model.num_train_timesteps", m.num_train_timesteps, ">= 2")
    _check(m.pretrain_steps >= 0, "model.pretrain_steps", m.pretrain_steps, ">= 0")
    _check(m.pretrain_batch_size >= 1, "model.pretrain_batch_size", m.pretrain_batch_size, ">= 1")
    _check(m.pretrain_lr > 0, "model.pretrain_lr", m.pretrain_lr, "> 0")
    for sec in ("encoder", "finetune"):
        t: TrainStepConfig = getattr(cfg, sec)
        _check(t.epochs >= 1, f"{sec}.epochs", t.epochs, ">= 1")
        _check(t.global_batch_size >= 1, f"{sec}.global_batch_size", t.global_batch_size, ">= 1")
        _check(t.lr > 0, f"{sec}.lr", t.lr, "> 0")
        _check(t.weight_decay >= 0, f"{sec}.weight_decay", t.weight_decay, ">= 0")
        _check(t.grad_clip_norm > 0, f"{sec}.grad_clip_norm", t.grad_clip_norm, "> 0")
        _check(t.steps_per_epoch is None or t.steps_per_epoch >= 1,
               f"{sec}.steps_per_epoch", t.steps_per_epoch, ">= 1 or none")
    s = cfg.sampling
    _check(1 <= s.num_inference_steps <= m.num_train_timesteps, "sampling.num_inference_steps",
           s.num_inference_steps, f"in [1, {m.num_train_timesteps}]")
    _check(s.guidance_scale >= 0, "sampling.guidance_scale", s.guidance_scale, ">= 0")
    _check(s.batch_size >= 1, "sampling.batch_size", s.batch_size, ">= 1")
    c = cfg.cas
    _check(c.max_epochs >= 1, "cas.max_epochs", c.max_epochs, ">= 1")
    _check(c.batch_size >= 1, "cas.batch_size", c.batch_size, ">= 1")
    _check(c.min_steps_per_epoch >= 0, "cas.min_steps_per_epoch", c.min_steps_per_epoch, ">= 0")
    _check(c.lr > 0, "cas.lr", c.lr, "> 0")
    _check(c.eps > 0, "cas.eps", c.eps, "> 0")
    _check(0 <= c.label_smoothing < 1, "cas.label_smoothing", c.label_smoothing, "in [0, 1)")
    _check(0 < c.plateau_factor < 1, "cas.plateau_factor", c.plateau_factor, "in (0, 1)")
    _check(c.plateau_patience >= 0, "cas.plateau_patience", c.plateau_patience, ">= 0")
    _check(0 <= c.min_lr <= c.lr, "cas.min_lr", c.min_lr, f"in [0, cas.lr={c.lr}]")
    _check(c.early_stopping_patience >= 1, "cas.early_stopping_patience", c.early_stopping_patience, ">= 1")
    _check(c.eval_batch_size >= 1, "cas.eval_batch_size", c.eval_batch_size, ">= 1")
    q = cfg.search
    _check(q.num_trials >= 1, "search.num_trials", q.num_trials, ">= 1")
    _check(q.num_images >= 1, "search.num_images", q.num_images, ">= 1")
    _check(1 <= q.min_inference_steps <= m.num_train_timesteps, "search.min_inference_steps", q.min_inference_steps,
           f"in 1..model.num_train_timesteps={m.num_train_timesteps}")
    _check(q.min_inference_steps <= q.max_inference_steps <= m.num_train_timesteps, "search.max_inference_steps",
           q.max_inference_steps, f"in search.min_inference_steps={q.min_inference_steps}..{m.num_train_timesteps}")
    _check(q.max_guidance_scale >= 0, "search.max_guidance_scale", q.max_guidance_scale, ">= 0")
    _check(q.reduction_factor >= 2, "search.reduction_factor", q.reduction_factor, ">= 2")
    _check(q.grace_period >= 1, "search.grace_period", q.grace_period, ">= 1")
    _check(q.max_concurrent_trials is None or q.max_concurrent_trials >= 1,
           "search.max_concurrent_trials", q.max_concurrent_trials, ">= 1 or none")
    k = cfg.scale
    _check(len(k.scales) >= 1 and all(1 <= x <= 1000 for x in k.scales), "scale.scales", k.scales,
           "a non-empty list of integers in [1, 1000]")
    _check(k.shard_size >= 1, "scale.shard_size", k.shard_size, ">= 1")
    r = cfg.resources
    _check(r.num_workers >= 1, "resources.num_workers", r.num_workers, ">= 1")
    for key in ("gpus_per_worker", "cpus_per_worker", "gpus_per_trial", "cpus_per_trial"):
        _check(getattr(r, key) >= 0, f"resources.{key}", getattr(r, key), ">= 0")
    _check(r.generation_actors is None or r.generation_actors >= 1, "resources.generation_actors",
           r.generation_actors, ">= 1 or none")
    _check(r.torch_threads is None or r.torch_threads >= 1, "resources.torch_threads", r.torch_threads, ">= 1 or none")
    _check(r.max_failures >= 0, "resources.max_failures", r.max_failures, ">= 0")
    _check(cfg.seed >= 0, "seed", cfg.seed, ">= 0")
    _check(bool(cfg.run_dir.strip()), "run_dir", cfg.run_dir, "a directory path or URI")


# --------------------------------------------------------------------------------------------
# The README's configuration reference, generated from the dataclasses above


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class body (its documentation)."""
    import inspect
    import re

    out: dict[str, str] = {}
    pending: str | None = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s{4}(\w+): [^#]*?(?:#\s*(.*))?$", line)
        if m:
            pending = m.group(1)
            out[pending] = (m.group(2) or "").strip()
        elif pending and re.match(r"\s{4}\)", line):
            pending = None
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def reference_markdown() -> str:
    """Markdown tables of every key: type, paper default, the presets that change it, meaning."""
    base = Config()
    presets = {name: load_config(name, absolute_paths=False) for name in PRESETS if name != "paper"}
    lines: list[str] = [
        "Every key can be set with `--set key=value` (repeatable) or a YAML/JSON file given to",
        "`--config`. Defaults are the `paper` preset; the columns on the right show what the",
        "other presets change. This section is generated by `python -m raysd.config --readme",
        "README.md` and a test fails if it drifts from the code.",
        "",
    ]
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(base, f.name))]
    sections = [f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(base, f.name))]
    groups: list[tuple[str, type, list[str]]] = [("(top level)", Config, [f.name for f in top])]
    for f in sections:
        obj = getattr(base, f.name)
        groups.append((f.name, type(obj), [g.name for g in dataclasses.fields(obj)]))
    for title, cls, names in groups:
        doc = " ".join((cls.__doc__ or "").split()) if cls is not Config else "Run-wide settings."
        header = f"`{title}`" if cls is not Config else title
        lines += [f"**{header}** — {doc}", ""]
        lines.append("| key | type | paper | " + " | ".join(presets) + " | meaning |")
        lines.append("|---|---|---|" + "---|" * len(presets) + "---|")
        comments = _field_comments(cls)
        types_ = _field_types(cls)
        prefix = "" if cls is Config else title + "."
        for name in names:
            key = prefix + name
            default = _get(base, key)
            cells = []
            for cfg in presets.values():
                v = _get(cfg, key)
                cells.append(f"`{_fmt(v)}`" if v != default else "")
            meaning = comments.get(name, "").replace("|", "\\|")
            tname = _type_name(types_[name]).replace("|", "\\|")
            lines.append(f"| `{key}` | {tname} | `{_fmt(default)}` | " + " | ".join(cells) + f" | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def write_readme_reference(readme: str | Path) -> bool:
    """Replace the README's generated section; returns whether it changed."""
    path = Path(readme)
    text = path.read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    if start not in text or end not in text:
        raise RaysdError(f"{path}: markers {start.strip()} and {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = head + start + reference_markdown() + end + tail
    path.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m raysd.config --readme README.md
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--readme":
        changed = write_readme_reference(sys.argv[2])
        print(f"{sys.argv[2]}: configuration reference {'updated' if changed else 'already current'}")
    else:
        print(reference_markdown())
