"""Which generator a stage uses: checkpoints and sampler settings from explicit choices, the
run's search results and the config (in that order), as a :class:`GeneratorSpec`."""

from __future__ import annotations

from typing import Any

from raysd.core.generator import GeneratorSpec
from raysd.data import checkpoints as ck
from raysd.data import storage
from raysd.errors import RaysdError
from raysd.run.rundir import Run

SEARCHED = ("num_inference_steps", "guidance_scale", "encoder_epoch", "unet_epoch")


def best_params(run: Run) -> dict[str, Any]:
    """The newest search result of the run (phase 2, else 1), or {}."""
    for phase in (2, 1):
        path = storage.join(run.search_dir(phase), "best.json")
        if storage.exists(path):
            best = storage.read_json(path)
            return {k: best[k] for k in SEARCHED if k in best}
    return {}


def _epochs(run: Run, encoder_epoch: int | None, unet_epoch: int | None, use_unet: bool | None,
            best: dict[str, Any]) -> tuple[int, int | None]:
    """(encoder epoch, UNet epoch or None), each with a valid checkpoint; a fine-tuned UNet pairs
    with the encoder epoch it was fine-tuned with."""
    enc_root, unet_root = run.ckpt_root("encoder"), run.ckpt_root("unet")
    enc_valid = ck.valid_epochs(enc_root)
    if not enc_valid:
        raise RaysdError(f"generate: no Class-Encoder checkpoints in {enc_root}; run `raysd train-encoder` first")
    e = encoder_epoch or best.get("encoder_epoch") or enc_valid[-1]
    if e not in enc_valid:
        raise RaysdError(f"generate: encoder epoch {e} has no valid checkpoint in {enc_root}; available: {enc_valid}")
    unet_valid = ck.valid_epochs(unet_root)
    f = unet_epoch or best.get("unet_epoch")
    if f is None and use_unet is not False and unet_valid:
        f = unet_valid[-1]
    if use_unet is False:
        f = None
    if f is not None:
        if f not in unet_valid:
            raise RaysdError(f"generate: unet epoch {f} has no valid checkpoint in {unet_root}; available: {unet_valid}")
        e = ck.read_meta(ck.epoch_dir(unet_root, f)).get("encoder_epoch") or e
    return e, f


def resolve_spec(run: Run, *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 encoder_epoch: int | None = None, unet_epoch: int | None = None, scheduler: str | None = None,
                 use_unet: bool | None = None, best: dict[str, Any] | None = None) -> GeneratorSpec:
    """The generator for this run. Unset values come from ``best`` (default: the run's newest
    search result), then the config. Values are trusted: the CLI and the config validated them."""
    cfg = run.cfg
    best = best_params(run) if best is None else best
    e, f = _epochs(run, encoder_epoch, unet_epoch, use_unet, best)
    steps = num_inference_steps or best.get("num_inference_steps") or cfg.sampling.num_inference_steps
    ugs = guidance_scale if guidance_scale is not None else best.get("guidance_scale", cfg.sampling.guidance_scale)
    m = cfg.model
    return GeneratorSpec(
        base=run.base_spec(), resolution=m.resolution, encoder_dir=ck.epoch_dir(run.ckpt_root("encoder"), e),
        unet_dir=ck.epoch_dir(run.ckpt_root("unet"), f) if f else None, out_size=run.image_size,
        num_inference_steps=int(steps), guidance_scale=float(ugs), scheduler=scheduler or cfg.sampling.scheduler,
        precision=m.precision, beta_start=m.beta_start, beta_end=m.beta_end, num_train_timesteps=m.num_train_timesteps,
        prediction_type=m.prediction_type,
        seed=cfg.seed, compile=cfg.sampling.compile, fuse_qkv=cfg.sampling.fuse_qkv, tiny_decoder=m.tiny_decoder)


def spec_provenance(spec: GeneratorSpec) -> dict[str, Any]:
    """Parameters plus the checkpoints' weight checksums (what a set's meta.json records)."""
    d = spec.to_dict()
    d["encoder_sha256"] = ck.read_meta(spec.encoder_dir)["files"][ck.MODEL_FILE]
    d["unet_sha256"] = ck.read_meta(spec.unet_dir)["files"][ck.MODEL_FILE] if spec.unet_dir else None
    for k in ("encoder_dir", "unet_dir"):
        d[k] = str(d[k]).rsplit("/", 2)[-2:] if d[k] else None  # kind/epoch_NNN, not the machine's path
    return d
