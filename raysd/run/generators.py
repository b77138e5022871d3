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


def _checked(root: str, chosen: int | None, what: str) -> int | None:
    """``chosen`` if its checkpoint is valid (else one line naming the valid ones); without a choice
    the newest valid one (None when there is none). Only the checkpoints looked at are verified."""
    if chosen is not None:
        if not ck.is_valid(ck.epoch_dir(root, chosen)):
            raise RaysdError(f"generate: {what} epoch {chosen} has no valid checkpoint in {root}; available: "
                             f"{ck.valid_epochs(root)}")
        return chosen
    return next((e for e in sorted(ck.recorded_epochs(root), reverse=True) if ck.is_valid(ck.epoch_dir(root, e))),
                None)


def _epochs(run: Run, encoder_epoch: int | None, unet_epoch: int | None, use_unet: bool | None,
            best: dict[str, Any]) -> tuple[int, int | None]:
    """(encoder epoch, UNet epoch or None), each with a valid checkpoint; a fine-tuned UNet pairs
    with the encoder epoch it was fine-tuned with."""
    enc_root, unet_root = run.ckpt_root("encoder"), run.ckpt_root("unet")
    e = _checked(enc_root, encoder_epoch or best.get("encoder_epoch"), "encoder")
    if e is None:
        raise RaysdError(f"generate: no Class-Encoder checkpoints in {enc_root}; run `raysd train-encoder` first")
    f = None if use_unet is False else _checked(unet_root, unet_epoch or best.get("unet_epoch"), "unet")
    if f is not None:
        e = ck.read_meta(ck.epoch_dir(unet_root, f)).get("encoder_epoch") or e
        _checked(enc_root, e, "encoder")
    return e, f


def spec_for(run: Run, *, encoder_epoch: int, unet_epoch: int | None, num_inference_steps: int,
             guidance_scale: float, scheduler: str | None = None) -> GeneratorSpec:
    """The generator of these (already checked) checkpoints and sampler settings; reads nothing."""
    cfg, m = run.cfg, run.cfg.model
    return GeneratorSpec(
        base=run.base_spec(), resolution=m.resolution, encoder_dir=ck.epoch_dir(run.ckpt_root("encoder"), encoder_epoch),
        unet_dir=ck.epoch_dir(run.ckpt_root("unet"), unet_epoch) if unet_epoch else None, out_size=run.image_size,
        num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
        scheduler=scheduler or cfg.sampling.scheduler, precision=m.precision, beta_start=m.beta_start,
        beta_end=m.beta_end, num_train_timesteps=m.num_train_timesteps, prediction_type=m.prediction_type,
        seed=cfg.seed, compile=cfg.sampling.compile, fuse_qkv=cfg.sampling.fuse_qkv, tiny_decoder=m.tiny_decoder)


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
    return spec_for(run, encoder_epoch=e, unet_epoch=f, num_inference_steps=steps, guidance_scale=ugs,
                    scheduler=scheduler)


OPERATIONAL_SPEC = ("compile", "fuse_qkv")  # fast paths: the same images (DESIGN section 5), not another set


def spec_identity(spec: GeneratorSpec, shas: tuple[str, str | None] | None = None,
                  base: str | None = None) -> dict[str, Any]:
    """What decides a generator's images: its settings without the fast paths, its base by content
    and its checkpoints by their weights' checksums (``shas``: (encoder, unet), read from their
    records when not given; ``base``: the base's identity, read from its record when not given),
    not by where they lie."""
    from raysd.data.models import base_content

    d = {k: v for k, v in spec.to_dict().items() if k not in OPERATIONAL_SPEC + ("encoder_dir", "unet_dir")}
    d["base"] = base if base is not None else base_content(spec.base)
    enc, unet = shas if shas is not None else checkpoint_shas(spec)
    return {**d, "encoder_sha256": enc, "unet_sha256": unet}


def checkpoint_shas(spec: GeneratorSpec) -> tuple[str, str | None]:
    return ck.weights_sha(spec.encoder_dir), (ck.weights_sha(spec.unet_dir) if spec.unet_dir else None)


def spec_provenance(spec: GeneratorSpec) -> dict[str, Any]:
    """Parameters plus the checkpoints' weight checksums (what a set's meta.json records)."""
    d = spec.to_dict()
    d["encoder_sha256"] = ck.read_meta(spec.encoder_dir)["files"][ck.MODEL_FILE]
    d["unet_sha256"] = ck.read_meta(spec.unet_dir)["files"][ck.MODEL_FILE] if spec.unet_dir else None
    for k in ("encoder_dir", "unet_dir"):
        d[k] = str(d[k]).rsplit("/", 2)[-2:] if d[k] else None  # kind/epoch_NNN, not the machine's path
    return d
