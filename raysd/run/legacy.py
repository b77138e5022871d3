"""The identities raysd computed before stage identity came from the schema (up to commit 40e5066):
whole config sections hashed into stage keys, training hashes, search fingerprints and set
fingerprints. Kept so that a run directory written by those versions is recognised for what it
is (its records are accepted and rewritten in the current scheme), never redone because the
scheme changed.

The sections are hashed over the fields they had then (``FIELDS``): a setting added since takes
its default in such a run, and the default reproduces the old behaviour.
"""

from __future__ import annotations

from typing import Any

from raysd.config import Config, fingerprint

FIELDS: dict[str, tuple[str, ...]] = {
    "dataset": ("name", "data_dir", "download"),
    "model": ("base_model", "seq_len", "resolution", "hidden_dim", "null_class", "label_dropout", "beta_start",
              "beta_end", "num_train_timesteps", "prediction_type", "precision", "frozen_dtype", "tiny_decoder",
              "pretrain_steps", "pretrain_batch_size", "pretrain_lr"),
    "encoder": ("epochs", "global_batch_size", "lr", "weight_decay", "grad_clip_norm", "steps_per_epoch",
                "checkpoint_dtype", "gradient_checkpointing", "optimizer"),
    "sampling": ("scheduler", "num_inference_steps", "guidance_scale", "batch_size", "compile", "fuse_qkv"),
    "cas": ("variant", "max_epochs", "batch_size", "min_steps_per_epoch", "lr", "eps", "label_smoothing",
            "plateau_factor", "plateau_patience", "min_lr", "early_stopping_patience", "eval_batch_size", "compile",
            "image_size"),
    "search": ("num_trials", "num_images", "scheduler", "objective", "min_inference_steps", "max_inference_steps",
               "max_guidance_scale", "reduction_factor", "grace_period", "brackets", "max_concurrent_trials"),
    "scale": ("scales", "class_balance", "shard_size", "keep_full_resolution"),
}
FIELDS["finetune"] = FIELDS["encoder"]
SPEC_FIELDS = ("base", "resolution", "encoder_dir", "unet_dir", "out_size", "num_inference_steps", "guidance_scale",
               "scheduler", "precision", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "seed",
               "compile", "fuse_qkv", "tiny_decoder")


def _sec(cfg: Config, *names: str) -> dict[str, Any]:
    d = cfg.to_dict()
    return {n: {k: d[n][k] for k in FIELDS[n]} for n in names}


def _stage_hash(cfg: Config, *sections: str, extra: Any = None) -> str:
    body: dict[str, Any] = _sec(cfg, *sections)
    body["seed"] = cfg.seed
    body["extra"] = extra
    return fingerprint(body)


def training_hash(cfg: Config, kind: str, encoder_epoch: int | None = None) -> str:
    if kind == "pretrain":
        keys = {k: v for k, v in _sec(cfg, "model")["model"].items() if k.startswith("pretrain") or k in (
            "base_model", "resolution", "seq_len", "beta_start", "beta_end", "num_train_timesteps")}
        return _stage_hash(cfg, "dataset", extra=keys)
    sections = ("dataset", "model", "encoder") + (("finetune",) if kind == "unet" else ())
    return _stage_hash(cfg, *sections, extra=encoder_epoch)


def search_fingerprint(cfg: Config, phase: int, space: dict[str, Any], fixed: dict[str, Any]) -> str:
    return fingerprint({"phase": phase, "space": space, "fixed": fixed, "search": _sec(cfg, "search")["search"],
                        "cas": _sec(cfg, "cas")["cas"], "sampling": cfg.sampling.scheduler, "seed": cfg.seed,
                        "train": training_hash(cfg, "unet" if phase == 2 else "encoder", fixed.get("encoder_epoch"))})


def spec_dict(spec: Any) -> dict[str, Any]:
    """A GeneratorSpec as ``to_dict()`` gave it then."""
    d = spec.to_dict()
    return {k: d[k] for k in SPEC_FIELDS}


def set_fingerprint(spec: Any, shas: tuple[str, str | None], num_images: int, class_balance: str, shard_size: int,
                    keep_full_resolution: bool) -> str:
    """The fingerprint ``generate`` recorded in a set's generation.json and meta.json."""
    d = spec_dict(spec)
    d["encoder_sha256"], d["unet_sha256"] = shas
    for k in ("encoder_dir", "unet_dir"):
        d[k] = str(d[k]).rsplit("/", 2)[-2:] if d[k] else None
    return fingerprint({"generator": d, "num_images": num_images, "class_balance": class_balance,
                        "shard_size": shard_size, "keep_full_resolution": keep_full_resolution})


def trial_images_key(spec: Any, num_images: int) -> str:
    return fingerprint([spec_dict(spec), num_images])


def _base_key(cfg: Config, out: dict) -> Any:
    return out.get("pretrain", {}).get("base_sha256") or cfg.model.base_model


def _pretrain_key(cfg: Config, out: dict) -> Any:
    m = _sec(cfg, "model")["model"]
    return [{k: v for k, v in m.items() if k.startswith("pretrain") or k in ("base_model", "resolution", "seq_len")},
            out["prepare"]["fingerprint"], cfg.seed]


KEYS: dict[str, Any] = {  # the stage keys of pipeline.STAGES as they were
    "prepare": lambda c, o: [c.dataset.name, c.dataset.data_dir],
    "pretrain": _pretrain_key,
    "train_encoder": lambda c, o: [_sec(c, "model", "encoder"), o["prepare"]["fingerprint"], _base_key(c, o), c.seed],
    "after_1": lambda c, o: [_sec(c, "sampling", "cas"), c.search.num_images, o["train_encoder"]["checkpoints"], c.seed],
    "search_1": lambda c, o: [_sec(c, "search", "cas"), c.sampling.scheduler, o["train_encoder"]["checkpoints"],
                              c.seed],
    "finetune": lambda c, o: [_sec(c, "model", "encoder", "finetune"), o["search_1"]["best"]["encoder_epoch"],
                              o["train_encoder"]["checkpoints"], _base_key(c, o), c.seed],
    "after_3": lambda c, o: [_sec(c, "cas"), c.sampling.scheduler, c.search.num_images,
                             {k: o["search_1"]["best"][k] for k in ("num_inference_steps", "guidance_scale")},
                             o["finetune"]["checkpoints"], c.seed],
    "search_2": lambda c, o: [_sec(c, "search", "cas"), c.sampling.scheduler, o["search_1"]["best"],
                              o["finetune"]["checkpoints"], c.seed],
    "generate": lambda c, o: [max(c.scale.scales), c.scale.class_balance, c.scale.shard_size,
                              c.scale.keep_full_resolution, c.sampling.scheduler, c.sampling.batch_size,
                              o["search_2"]["best"], o["finetune"]["checkpoints"], c.seed],
    "scaling": lambda c, o: [_sec(c, "cas"), sorted(c.scale.scales), c.scale.class_balance, o["generate"]["fingerprint"],
                             o["prepare"]["fingerprint"], c.seed],
    "report": lambda c, o: [fingerprint(o)],
}


def stage_key(name: str, cfg: Config, outputs: dict[str, Any]) -> str | None:
    """The key an earlier raysd recorded for stage ``name`` with ``cfg`` and these upstream outputs
    (None when they lack what it used)."""
    try:
        return fingerprint(KEYS[name](cfg, outputs))
    except (KeyError, TypeError):
        return None
