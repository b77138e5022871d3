"""The configuration's schema: a tree of dataclasses whose fields carry their help text and their
rule in field metadata, so validation and the reference (docs/configuration.md) come from one table.

The defaults are the paper's settings (DESIGN.md section 1); presets (data, in ``presets.py``)
change a few keys. A rule's bounds may name another key (``le="model.num_train_timesteps"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from raysd.config.fields import (CAS, GENERATION, MADE, OPERATIONAL, SEARCHES, STAGES, TRAINED, TRAINING, Rule,  # noqa: F401
                                 section, setting)

# --------------------------------------------------------------------------------------------
# Sections

REGISTERED_DATASETS = ("cifar10", "cifar100", "pathmnist", "dermamnist", "bloodmnist", "retinamnist", "digits")
MAX_GUIDANCE = 100.0  # UGS above this is not guidance any more; one bound for the config and the CLI


def _dataset_name_ok(name: str, cfg: Any) -> bool:
    return name in REGISTERED_DATASETS or name.startswith(("npz:", "folder:"))


def _nonblank(value: str, cfg: Any) -> bool:
    return bool(value.strip())


def _pretraining(cfg: Any, stage: str | None = None) -> bool:
    return cfg.model.pretrain_steps > 0


def _asha(cfg: Any, stage: str | None = None) -> bool:
    return cfg.search.scheduler == "asha"


def _scales_ok(value: list[int], cfg: Any) -> bool:
    return len(value) >= 1 and all(1 <= x <= 1000 for x in value)


@dataclass
class DatasetConfig:
    """Which real dataset: a registered name, ``npz:PATH`` or ``folder:PATH``."""

    name: str = setting("cifar10", "registered name (cifar10, cifar100, pathmnist, dermamnist, bloodmnist, retinamnist, "
                        "digits), npz:PATH or folder:PATH", check=_dataset_name_ok,
                        text="a registered dataset, npz:PATH or folder:PATH", affects=("prepare",))
    data_dir: str | None = setting(None, "where the raw files live (torchvision / medmnist layout)", affects=OPERATIONAL)
    download: bool = setting(True, "fetch through torchvision / medmnist when absent (needs internet)", affects=OPERATIONAL)


@dataclass
class ModelConfig:
    """The base diffusion model and the Class-Encoder built on it."""

    base_model: str = setting("stabilityai/stable-diffusion-2-base", "hub id or local diffusers directory; tiny / "
                              "tiny-vae / random:sd2-base / random:sd-v1 build random models offline",
                              check=_nonblank, text="a hub id, a directory or 'tiny'", affects=TRAINING + GENERATION)
    seq_len: int = setting(77, "L, the context length the Class-Encoder emits (SD2: 77; released code: 100)",
                           ge=1, le=1024, affects=("pretrain", "train_encoder"))
    resolution: int = setting(128, "px fed to SD: 32/28 px images upsampled to this (16x16 latents)", ge=8, le=1024,
                              check=lambda v, c: v % 8 == 0, text="a multiple of 8 in [8, 1024]", affects=TRAINING + GENERATION)
    hidden_dim: int = setting(500, "Class-Encoder's hidden width (paper: 500)", ge=1, affects=("train_encoder",))
    null_class: bool = setting(False, "learned null class + label dropout (CFG training, not in the paper)", affects=("train_encoder", "finetune"))
    label_dropout: float = setting(0.1, "probability of the null class while training, when null_class", ge=0, lt=1, affects=("train_encoder", "finetune"))
    beta_start: float = setting(0.00085, "scaled_linear noise schedule start", gt=0, lt=1, affects=TRAINING + GENERATION)
    beta_end: float = setting(0.012, "scaled_linear noise schedule end", gt="model.beta_start", lt=1, affects=TRAINING + GENERATION)
    num_train_timesteps: int = setting(1000, "diffusion training timesteps T", ge=2, affects=TRAINING + GENERATION)
    prediction_type: Literal["epsilon", "v_prediction"] = setting("epsilon", "what the UNet predicts (SD 2-base: "
                                                                   "epsilon; SD 2's 768 px models: v_prediction); "
                                                                   "checked against the base's scheduler config", affects=TRAINING + GENERATION)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = setting("auto", "auto/bf16: bf16 on GPU; on a CPU with "
                                                                 "native bf16 (AVX512-BF16, AMX) bf16 generation and "
                                                                 "CAS, fp32 training; fp32 on other CPUs; fp32: the "
                                                                 "released numerics", affects=TRAINING + GENERATION + CAS)
    frozen_dtype: Literal["fp32", "bf16"] = setting("fp32", "weights of the frozen UNet in step 1 on CUDA (bf16 "
                                                    "halves them)", affects=("train_encoder",))
    tiny_decoder: str | None = setting(None, "AutoencoderTiny (TAESD) hub id or directory decoding instead of the VAE; "
                                       "CAS effect unmeasured", affects=GENERATION)
    # the pretrained base is the base of every later stage: its settings determine them all
    pretrain_steps: int = setting(0, "unconditional pretraining steps of a randomly initialised base (the small "
                                  "preset; 0 = use the weights as loaded)", ge=0, affects=TRAINING + GENERATION)
    pretrain_batch_size: int = setting(64, "batch of that pretraining", ge=1, affects=TRAINING + GENERATION,
                                       when=_pretraining)
    base_cache: str | None = setting("~/.cache/raysd/bases", "where a pretrained base is kept for later runs on the "
                                     "same data and settings (keyed by the pretrain stage's key); None: not kept",
                                     affects=OPERATIONAL)
    pretrain_lr: float = setting(1e-3, "learning rate of that pretraining", gt=0, affects=TRAINING + GENERATION,
                                 when=_pretraining)


@dataclass
class TrainStepConfig:
    """Step 1 (Class-Encoder) or step 3 (UNet fine-tuning): AdamW + cosine decay per step."""

    epochs: int = setting(50, "epochs; one checkpoint per epoch, all kept for the searches", ge=1, affects=TRAINED)
    global_batch_size: int = setting(64, "images per optimizer step, split across workers", ge=1, affects=TRAINED)
    lr: float = setting(1e-4, "peak learning rate, cosine-decayed to 0 per step", gt=0, affects=TRAINED)
    weight_decay: float = setting(4e-3, "decoupled (AdamW)", ge=0, affects=TRAINED)
    grad_clip_norm: float = setting(10.0, "global norm", gt=0, affects=TRAINED)
    steps_per_epoch: int | None = setting(None, "None: one pass over the train split; N: exactly N steps (data cycled)",
                                          ge=1, optional=True, affects=TRAINED)
    checkpoint_dtype: Literal["fp32", "bf16"] = setting("fp32", "dtype of the saved weights (bf16 halves a UNet "
                                                        "checkpoint)", affects=TRAINED)
    gradient_checkpointing: bool = setting(False, "recompute the UNet's activations in the backward pass (about a "
                                           "sixth of their memory, roughly a third more time)", affects=OPERATIONAL)
    optimizer: Literal["adamw", "adamw_8bit"] = setting("adamw", "adamw (fused on CUDA) or adamw_8bit (bitsandbytes, "
                                                        "CUDA: a quarter of the moments' memory)", affects=TRAINED)


def _lora(cfg: Any, stage: str | None = None) -> bool:
    return cfg.finetune.method == "lora"


def _targets_ok(value: list[str], cfg: Any) -> bool:
    return len(value) >= 1 and all(v.strip() for v in value)


@dataclass
class FinetuneConfig(TrainStepConfig):
    """Step 3: the UNet, whole (the paper) or through a LoRA adapter; AdamW + cosine decay per step."""

    method: Literal["full", "lora"] = setting("full", "full: every UNet weight trains (the paper); lora: a low-rank "
                                              "adapter on the attention projections (peft), checkpoints of a few MB "
                                              "(a LoRA usually wants a larger finetune.lr, e.g. 1e-4)", affects=TRAINED)
    lora_rank: int = setting(8, "LoRA rank r", ge=1, affects=TRAINED, when=_lora)
    lora_alpha: float | None = setting(None, "LoRA alpha (scale alpha / r); none: equal to the rank", gt=0,
                                       optional=True, affects=TRAINED, when=_lora)
    lora_targets: list[str] = setting(help="UNet modules whose names end so get an adapter (diffusers' attention "
                                      "projections)", factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                      check=_targets_ok, text="a non-empty list of module name endings",
                                      affects=TRAINED, when=_lora)


def _finetune_defaults() -> FinetuneConfig:
    return FinetuneConfig(epochs=10, global_batch_size=16, lr=1e-5)


@dataclass
class SamplingConfig:
    """Defaults of the guided sampler (the searches override IS and UGS)."""

    scheduler: Literal["ddim", "dpmpp", "unipc"] = setting("ddim", "ddim (eta 0, the released code), DPM-Solver++ or "
                                                           "UniPC", affects=GENERATION)
    num_inference_steps: int = setting(50, "IS; for ddim the released code's spacing (IS=31 -> 32 steps)", ge=1,
                                       le="model.num_train_timesteps", affects=("after_1",))
    guidance_scale: float = setting(7.5, "UGS", ge=0, le=MAX_GUIDANCE, affects=("after_1",))
    batch_size: int = setting(256, "images per sampler call; halved and retried on CUDA out-of-memory", ge=1, affects=OPERATIONAL)
    compile: bool = setting(False, "torch.compile the UNet and VAE decoder (static shapes: batches padded to "
                            "batch_size)", affects=OPERATIONAL)
    fuse_qkv: bool = setting(False, "fuse the attention Q/K/V projections into one matmul (diffusers)", affects=OPERATIONAL)


def _strong(cfg: Any, stage: str | None = None) -> bool:
    """The strong protocol's settings count where it trains: every CAS under it, or Table 2 beside the paper's."""
    return cfg.cas.protocol == "strong" or (cfg.cas.both_protocols and stage in (None, "scaling"))


@dataclass
class CasConfig:
    """ResNet20 CAS protocol of the paper's released code."""

    protocol: Literal["paper", "strong"] = setting(
        "paper", "the classifier recipe of every CAS in the run (search trials, Table 1, Table 2, `raysd cas`): paper, "
        "the released code's (Adam, plateau, early stopping, no augmentation); strong, a standard recipe for small "
        "images (He et al.'s ResNet20, crop and flip, SGD with Nesterov momentum, one-cycle schedule; "
        "docs/method.md)", affects=CAS)
    both_protocols: bool = setting(False, "Table 2 under the other protocol too (the report shows both)", affects=("scaling",))
    strong_epochs: int = setting(30, "the strong protocol's epochs (its one-cycle schedule spans them; no early "
                                 "stopping)", ge=1, affects=CAS, when=_strong)
    strong_lr: float = setting(0.1, "the strong protocol's peak SGD learning rate at batch 128 (scaled linearly "
                               "with the batch)", gt=0, affects=CAS, when=_strong)
    strong_flip: bool = setting(True, "the strong protocol's random flips (off where a mirror is another class)",
                                affects=CAS, when=_strong)
    variant: Literal["paper", "standard"] = setting("paper", "paper: the released code's wide ResNet20 (4.29 M "
                                                    "params); standard: He et al.'s (0.27 M). The paper "
                                                    "protocol's network (the strong one's is standard)", affects=CAS)
    max_epochs: int = setting(100, "epoch limit (also the search schedulers' max_t)", ge=1, affects=CAS)
    batch_size: int = setting(256, "training batch", ge=1, affects=CAS)
    min_steps_per_epoch: int = setting(0, "> 0: smaller batches for small sets (batch <= N / this); 0: batch_size "
                                       "always", ge=0, affects=CAS)
    lr: float = setting(1e-3, "Adam learning rate", gt=0, affects=CAS)
    eps: float = setting(1e-7, "Keras' Adam epsilon", gt=0, affects=CAS)
    label_smoothing: float = setting(0.1, "cross-entropy label smoothing", ge=0, lt=1, affects=CAS)
    plateau_factor: float = setting(0.1, "ReduceLROnPlateau factor (on val accuracy)", gt=0, lt=1, affects=CAS)
    plateau_patience: int = setting(10, "ReduceLROnPlateau patience, epochs", ge=0, affects=CAS)
    min_lr: float = setting(1e-5, "ReduceLROnPlateau floor", ge=0, le="cas.lr", affects=CAS)
    early_stopping_patience: int = setting(25, "epochs without val improvement before stopping (best weights "
                                           "restored)", ge=1, affects=CAS)
    seeds: int = setting(3, "classifier seeds per Table 2 row and `raysd cas` (real data and each scale): top1 is "
                            "their mean, each seed's scores are kept with their sd", ge=1, affects=("scaling",))
    two_sample_images: int = setting(5000, "real-vs-synthetic two-sample test: images per kind (the smallest "
                                     "scale's set against the real train split); 0: off", ge=0, affects=("scaling",))
    two_sample_epochs: int = setting(10, "epochs of the two-sample test's standard ResNet20", ge=1,
                                     affects=("scaling",))
    eval_batch_size: int = setting(1024, "batch for val/test evaluation", ge=1, affects=OPERATIONAL)
    compile: bool = setting(False, "torch.compile the classifier (worth it on a GPU for the 100-epoch protocol)", affects=OPERATIONAL)
    image_size: int | None = setting(None, "None: classify at the dataset's size (the paper); N: area-resize "
                                     "every image to NxN first (the demo: digits are 8x8 upsampled, 16 loses "
                                     "nothing and costs a quarter)", ge=4, optional=True, affects=CAS)

    @property
    def epoch_limit(self) -> int:
        """The most epochs one classifier trains (the search schedulers' max_t)."""
        return self.strong_epochs if self.protocol == "strong" else self.max_epochs

    def under(self, protocol: str) -> "CasConfig":
        """These settings with ``protocol`` as the recipe."""
        return dataclasses.replace(self, protocol=protocol)

    @property
    def other_protocol(self) -> str:
        return "strong" if self.protocol == "paper" else "paper"


@dataclass
class SearchConfig:
    """Steps 2 and 4: TPE + Hyperband over IS, UGS and the checkpoint epoch."""

    num_trials: int = setting(50, "trials per search phase", ge=1, affects=SEARCHES)
    num_images: int = setting(4000, "generated per trial, class-balanced", ge=1, affects=("after_1", "after_3") + SEARCHES)
    scheduler: Literal["hyperband", "asha"] = setting("hyperband", "trial scheduler; time unit = classifier epoch", affects=SEARCHES)
    objective: Literal["val", "test"] = setting("val", "\"test\" reproduces the paper (leaks the test set)", affects=SEARCHES)
    metric: Literal["top1", "balanced_accuracy"] = setting(
        "top1", "what a trial's classifier is scored by (its callbacks watch it on val too): top1, the paper's; "
        "balanced_accuracy (mean recall over classes) for imbalanced data", affects=SEARCHES)
    min_inference_steps: int = setting(5, "lower bound of IS (inclusive)", ge=1, le="model.num_train_timesteps", affects=SEARCHES)
    max_inference_steps: int = setting(50, "upper bound of IS in phase 1 (phase 2: IS*)",
                                       ge="search.min_inference_steps", le="model.num_train_timesteps", affects=("search_1",))
    max_guidance_scale: float = setting(7.5, "upper bound of UGS in phase 1 (phase 2: 2 UGS*)", ge=0, le=MAX_GUIDANCE, affects=("search_1",))
    reduction_factor: int = setting(3, "HyperBand/ASHA eta", ge=2, affects=SEARCHES)
    grace_period: int = setting(1, "ASHA: epochs before a trial may be stopped", ge=1, affects=SEARCHES, when=_asha)
    brackets: int = setting(1, "ASHA brackets; > 1: asynchronous HyperBand (the semantics of Optuna's "
                            "HyperbandPruner)", ge=1, affects=SEARCHES, when=_asha)
    max_concurrent_trials: int | None = setting(None, "None: as many as the resources allow", ge=1, optional=True, affects=OPERATIONAL)


@dataclass
class ScaleConfig:
    """Step 5: datasets of k times the real training-set size."""

    scales: list[int] = setting(help="k of the x1..xK datasets; the largest is generated, the others are stratified "
                                "prefixes", factory=lambda: list(range(1, 11)), check=_scales_ok,
                                text="a non-empty list of integers in [1, 1000]", affects=("generate", "scaling"), views={"generate": max})
    class_balance: Literal["real", "uniform"] = setting("real", "per-class counts: the real train split's proportions "
                                                        "or uniform", affects=("generate", "scaling"))
    shard_size: int = setting(1024, "sample_ids per Parquet shard (the unit of resumption)", ge=1, affects=("generate",))
    keep_full_resolution: bool = setting(False, "also store the 128 px images", affects=("generate",))


@dataclass
class AuditConfig:
    """The privacy audit of the largest synthetic set (after scaling; `raysd audit RUN`)."""

    enabled: bool = setting(True, "run the audit stage (near-copies, memorisation, membership inference)",
                            affects=("audit",))
    percentile: float = setting(1.0, "a synthetic image is a near-copy when its pixel distance to the closest "
                                "training image is below this percentile of held-out real images' distances",
                                gt=0, lt=50, affects=("audit",))
    allowed_share: float = setting(0.05, "the verdict: flagged when more than this share of the synthetic images "
                                   "are near-copies (held-out real images: `percentile` %)", gt=0, lt=1,
                                   affects=("audit",))
    duplicate_images: int = setting(5000, "near-duplicates inside the set are sought among its first N images (all "
                                    "pairs: N^2)", ge=2, affects=("audit",))
    closest_pairs: int = setting(8, "synthetic-train pairs shown, closest first", ge=1, le=64, affects=("audit",))
    images_per_task: int = setting(20000, "synthetic images per nearest-neighbour task (tasks spread over the "
                                   "cluster)", ge=1, affects=OPERATIONAL)


@dataclass
class ResourcesConfig:
    """Where work runs. ``device="auto"`` uses CUDA when the cluster has GPUs."""

    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: CUDA when the cluster has GPUs at the start "
                                                     "(said once in the log); cuda: wait for the autoscaler to add "
                                                     "them; cpu: never", affects=OPERATIONAL)
    num_workers: int = setting(1, "Ray Train workers (data parallel)", ge=1, affects=OPERATIONAL)
    cpu_finetune_workers: int | None = setting(None, "Ray Train workers of step 3 when it trains on CPUs (their "
                                               "threads share the node's cores); None: num_workers", ge=1,
                                               optional=True, affects=OPERATIONAL)
    gpus_per_worker: float = setting(1.0, "GPUs per Ray Train worker", ge=0, affects=OPERATIONAL)
    cpus_per_worker: float = setting(1.0, "CPUs per Ray Train worker", ge=0, affects=OPERATIONAL)
    torch_threads: int | None = setting(None, "CPU threads per worker/trial; None: its CPU reservation", ge=1,
                                        optional=True, affects=OPERATIONAL)
    gpus_per_trial: float | None = setting(None, "share of a GPU per search trial or CAS classifier; none: as many "
                                           "share one as fit its memory (resources.gpu_memory_gb), else a whole one",
                                           ge=0, optional=True, affects=OPERATIONAL)
    gpu_memory_gb: float | None = setting(None, "memory of one accelerator, GB; none: read on a GPU node (a custom "
                                          "accelerator resource: no sharing unless set)", gt=0, optional=True,
                                          affects=OPERATIONAL)
    trial_memory_gb: float | None = setting(None, "host memory a search trial or CAS classifier asks Ray for, GB; "
                                            "none: raysd's estimate (logged once per stage)", gt=0, optional=True,
                                            affects=OPERATIONAL)
    cpus_per_trial: float = setting(1.0, "CPUs per Ray Tune trial", ge=0, affects=OPERATIONAL)
    cpu_generation_actors: int | None = setting(None, "generation actors when generating on CPUs (their threads "
                                                "share the cluster's cores); None: CPUs // torch_threads", ge=1,
                                                optional=True, affects=OPERATIONAL)
    generation_actors: int | None = setting(None, "max size of the generation actor pool; None: every accelerator the "
                                            "cluster has or can grow to (resources.max_gpus)", ge=1, optional=True, affects=OPERATIONAL)
    max_gpus: int | None = setting(None, "accelerators the cluster can grow to (its autoscaler's maximum): sizes the "
                                   "generation pool and Tune's concurrency; None: those present", ge=1, optional=True, affects=OPERATIONAL)
    accelerator: str = setting("GPU", "the Ray resource one accelerator is: GPU, or a custom resource (other "
                               "accelerator types, tests); generation actors always ask for one", check=_nonblank,
                               text="a Ray resource name", affects=OPERATIONAL)
    gpu_wait_seconds: float = setting(900.0, "device=cuda: how long a stage waits for the autoscaler to add "
                                      "accelerators before it fails", gt=0, affects=OPERATIONAL)
    max_failures: int = setting(3, "Ray Train / Tune retries of a failed worker or trial (from its checkpoint)", ge=0, affects=OPERATIONAL)
    shared_storage: bool = setting(False, "a local run_dir is on a filesystem every node mounts at that path", affects=OPERATIONAL)
    lock_expiry_seconds: float = setting(300.0, "a run lock whose holder on another host has not renewed it for "
                                         "this long (watched from here) is taken over (the holder renews it every "
                                         "fifth of this)", gt=0, affects=OPERATIONAL)

    def train_workers(self, kind: str, device: str) -> int:
        """Ray Train's data-parallel workers for training ``kind`` on ``device`` ("cpu" or "cuda")."""
        if kind == "unet" and device == "cpu" and self.cpu_finetune_workers:
            return self.cpu_finetune_workers
        return self.num_workers


@dataclass
class Config:
    """The whole run. Build with :func:`raysd.config.load_config`, not by hand."""

    preset: Literal["demo", "small", "paper", "official"] = setting("paper", "the preset these values started from",
                                                                     affects=OPERATIONAL)
    seed: int = setting(0, "run seed: data order, per-sample generation seeds, classifier init, searches", ge=0, affects=MADE)
    run_dir: str = setting("runs/raysd", "run directory: local path or URI (s3://, gs://) shared by all nodes",
                           check=_nonblank, text="a directory path or URI", affects=OPERATIONAL)
    storage_endpoint: str | None = setting(None, "endpoint URL of an S3-compatible store for s3:// run directories "
                                           "(MinIO, Ceph, a test server); sets AWS_ENDPOINT_URL for raysd and "
                                           "its Ray workers", affects=OPERATIONAL)
    dataset: DatasetConfig = section(DatasetConfig)
    model: ModelConfig = section(ModelConfig)
    encoder: TrainStepConfig = section(TrainStepConfig, "step 1")
    finetune: FinetuneConfig = section(_finetune_defaults, "step 3")
    sampling: SamplingConfig = section(SamplingConfig)
    cas: CasConfig = section(CasConfig)
    search: SearchConfig = section(SearchConfig)
    scale: ScaleConfig = section(ScaleConfig)
    audit: AuditConfig = section(AuditConfig)
    resources: ResourcesConfig = section(ResourcesConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Stable hash of the whole config, or of the named top-level sections only."""
        d = self.to_dict()
        if sections:
            d = {k: d[k] for k in sections}
        return fingerprint(d)


def fingerprint(obj: Any) -> str:
    """The one identity function of raysd: 16 hex digits of SHA-256 over canonical JSON.

    Stage keys, set and search fingerprints, training hashes and the config hash all use it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
