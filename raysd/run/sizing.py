"""What each kind of raysd worker asks Ray for: host memory (Ray's ``memory`` resource) and, on
accelerators, memory on the card, from :mod:`raysd.core.memory`'s estimates and the model's size;
and from those, how many search trials or classifiers run at once on a node and share a GPU.

Ray schedules by what workers ask for: a search whose trials each hold an SD2 UNet runs only as
many at once as a node's memory holds, whatever its CPU count, and two trials share an 80 GB card
(half a GPU each) only when both fit. Host memory is asked for by workers that use no accelerator;
one that holds an accelerator (or a share of one) is bounded by it, and an autoscaler's node types
need not state their memory. ``resources.trial_memory_gb`` and ``resources.gpus_per_trial``
override the estimate and the choice; ``resources.gpu_memory_gb`` states a card's memory (else it
is read on a GPU node).
"""

from __future__ import annotations

from dataclasses import dataclass

from raysd.config import Config
from raysd.core import memory
from raysd.errors import RaysdError
from raysd.run.rundir import Run

GB = memory.GB


@dataclass(frozen=True)
class WorkerNeed:
    """Bytes one worker of a kind needs: host memory always, accelerator memory on CUDA."""

    kind: str
    host: float
    gpu: float
    lower: str

    def describe(self) -> str:
        gpu = f", {self.gpu / GB:.1f} GB on its GPU" if self.gpu else ""
        return f"a {self.kind} needs about {self.host / GB:.1f} GB of host memory{gpu}"


def sizes(cfg: Config) -> dict[str, int]:
    """Parameter counts of the base UNet and VAE and the Class-Encoder (counted once per process)."""
    from raysd.run.preflight import model_sizes

    return model_sizes(cfg)


def _half(cfg: Config, device: str) -> bool:
    from raysd.core.precision import weights_dtype

    import torch

    return weights_dtype(cfg.model.precision, device) != torch.float32


def _latent_side(cfg: Config, s: dict[str, int]) -> int:
    return cfg.model.resolution // (8 if s["vae"] else 1)


def _generator(cfg: Config, device: str, batch: int, adapter: bool) -> memory.GeneratorNeed:
    s = sizes(cfg)
    return memory.generator_need(unet_params=s["unet"], vae_params=s["vae"], latent_side=_latent_side(cfg, s),
                                 batch=batch, half=_half(cfg, device), adapter=adapter)


def classifier(cfg: Config, device: str, *, images: int, side: int, held_out: int) -> float:
    """A CAS classifier on ``images`` training images of ``side`` px, plus ``held_out`` val/test images."""
    c = cfg.cas
    side = c.image_size or side
    from raysd.core.strong import STRONG_BATCH

    # the larger of the two protocols' needs when Table 2 runs under both
    protocols = (c.protocol, c.other_protocol) if c.both_protocols else (c.protocol,)
    variant = "standard" if protocols == ("strong",) else c.variant
    batch = max(STRONG_BATCH if p == "strong" else c.batch_size for p in protocols)
    batch = batch if not c.min_steps_per_epoch else max(1, min(batch, images // c.min_steps_per_epoch))
    return memory.classifier_need(variant, side=side, batch=batch, images=images + held_out,
                                  half=_half(cfg, device))


def _held_out(run: Run) -> int:
    return int(run.meta("val")["num_rows"]) + int(run.meta("test")["num_rows"])


def trial(cfg: Config, run: Run, phase: int, device: str) -> WorkerNeed:
    """A search trial: its generator (loaded, then sampling) and its classifier."""
    return generator_cas(cfg, run, phase, device, images=cfg.search.num_images, kind="search trial")


def generator_cas(cfg: Config, run: Run, phase: int, device: str, *, images: int,
                  kind: str = "CAS classifier") -> WorkerNeed:
    """A generator scored in one worker (a search trial, the after_k CAS): its generator (loaded,
    then sampling ``images``) and the classifier trained on them."""
    gen = _generator(cfg, device, cfg.sampling.batch_size, adapter=phase == 2 and cfg.finetune.method == "lora")
    cls = classifier(cfg, device, images=images, side=max(run.image_size), held_out=_held_out(run))
    lower = "a smaller search.num_images or sampling.batch_size, or --set resources.trial_memory_gb=N"
    if device == "cuda":  # loaded on the host, then moved; sampled and classified on the card
        return WorkerNeed(kind, memory.process_need(gen.load), gen.sampling + cls, lower)
    return WorkerNeed(kind, memory.process_need(gen.load, gen.sampling + cls), 0.0, lower)


def generation_actor(cfg: Config, device: str) -> WorkerNeed:
    gen = _generator(cfg, device, cfg.sampling.batch_size, adapter=cfg.finetune.method == "lora")
    lower = "a smaller sampling.batch_size"
    if device == "cuda":
        return WorkerNeed("generation actor", memory.process_need(gen.load), gen.sampling, lower)
    return WorkerNeed("generation actor", memory.process_need(gen.load, gen.sampling), 0.0, lower)


def classifier_task(cfg: Config, device: str, *, images: int, side: int, held_out: int) -> WorkerNeed:
    cls = classifier(cfg, device, images=images, side=side, held_out=held_out)
    lower = "a smaller cas.batch_size"
    if device == "cuda":
        return WorkerNeed("CAS classifier", memory.process_need((images + held_out) * side * side * 3), cls, lower)
    return WorkerNeed("CAS classifier", memory.process_need(cls), 0.0, lower)


def audit_task(device: str, *, train: int, queries: int, side: int, features: int) -> WorkerNeed:
    """A nearest-neighbour task of the audit: the training images as float32 pixels and features, its
    queries (uint8 and float32), one block of distances and the classifier that embeds them."""
    from raysd.core.audit import BLOCK_ENTRIES

    data = (train + queries) * (side * side * 3 * 4 + features * 4) + queries * side * side * 3
    work = data + 2 * BLOCK_ENTRIES * 4 + memory.CLASSIFIER["paper"][0]
    lower = "a smaller audit.images_per_task"
    if device == "cuda":
        return WorkerNeed("audit task", memory.process_need(data), work, lower)
    return WorkerNeed("audit task", memory.process_need(work), 0.0, lower)


def training_worker(cfg: Config, run: Run, kind: str, device: str, workers: int) -> WorkerNeed:
    """A Ray Train worker of step 1, step 3 or the demo's pretraining, with the latent cache it reads whole."""
    s = sizes(cfg)
    step = cfg.encoder if kind == "encoder" else cfg.finetune if kind == "unet" else None
    batch = -(-(step.global_batch_size if step else cfg.model.pretrain_batch_size) // workers)
    lora = kind == "unet" and cfg.finetune.method == "lora"
    need = memory.training_need("encoder" if kind == "encoder" else "unet", unet_params=s["unet"],
                                encoder_params=s["encoder"], latent_side=_latent_side(cfg, s), batch=batch,
                                bf16=device == "cuda" and cfg.model.precision != "fp32",
                                checkpointing=bool(step and step.gradient_checkpointing),
                                optimizer=step.optimizer if step else "adamw",
                                adapter_params=memory.lora_params(s["unet"], cfg.finetune.lora_rank) if lora else 0)
    side = _latent_side(cfg, s)
    cache = run.num_train * (4 if s["vae"] else 3) * side * side * 4 * (2 if s["vae"] else 1)
    load = (s["unet"] + s["vae"]) * 4
    if device == "cuda":
        return WorkerNeed("training worker", memory.process_need(load + cache), need.bytes, need.lower)
    return WorkerNeed("training worker", memory.process_need(load + cache, need.bytes + cache), 0.0, need.lower)


def host_memory_request(cfg: Config, need: WorkerNeed) -> float:
    """The ``memory`` a search trial or classifier asks Ray for: the override, else the estimate (0:
    one that runs on an accelerator, which bounds it)."""
    r = cfg.resources
    if need.gpu:
        return 0.0
    return r.trial_memory_gb * GB if r.trial_memory_gb and need.kind in ("search trial", "CAS classifier") else need.host


def gpus_per_worker(cfg: Config, need: WorkerNeed, card_bytes: float | None) -> float:
    """The share of one accelerator a trial or classifier takes: ``resources.gpus_per_trial`` when set;
    else 1/k when k of them fit in the card's memory (k >= 2), else a whole one; refused when one
    does not fit alone."""
    r = cfg.resources
    if r.gpus_per_trial is not None:
        return r.gpus_per_trial
    if not card_bytes or not need.gpu:
        return 1.0
    fit = memory.per_device(card_bytes, need.gpu)
    if fit < 1:
        raise RaysdError(f"{need.describe()}, more than its {card_bytes / GB:.0f} GB card holds; lower it with "
                         f"{need.lower}")
    return 1.0 if fit == 1 else 1.0 / fit


def fit_on_nodes(need_bytes: float, node_memory: list[float]) -> int:
    """How many workers of ``need_bytes`` the nodes' memory holds at once (0: not even one)."""
    return sum(int(m // need_bytes) for m in node_memory) if need_bytes > 0 else 1_000_000
