"""Typed results that stages return and the manifest stores: a CAS :class:`Score` (a row of
Table 1 or Table 2) and a search's :class:`SearchBest`. JSON only at the edge (manifest,
best.json, results.json), in the shapes those files have always had."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raysd.core.cas import CasResult

PARAM_KEYS = ("num_inference_steps", "guidance_scale", "epoch")


@dataclass
class Score:
    """One CAS: ResNet20 trained on one set, early-stopped on real val, scored on real test."""

    top1: float
    top5: float
    num_images: int
    per_class_accuracy: list[float] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    best_epoch: int | None = None
    epochs_run: int | None = None
    seconds: float | None = None  # classifier training
    params: dict[str, Any] | None = None  # IS, UGS, epoch of a Table 1 row
    generation_seconds: float | None = None
    images_per_second: float | None = None
    train: str | None = None  # the set trained on
    best_val_top1: float | None = None
    device: str | None = None
    # balanced_accuracy, macro_f1, auc, interval (raysd.core.metrics); empty for runs of older versions
    metrics: dict[str, Any] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)  # per test image (paired comparisons)

    @classmethod
    def of(cls, result: CasResult, *, num_images: int, **extra: Any) -> "Score":
        return cls(top1=result.top1, top5=result.top5, num_images=num_images,
                   per_class_accuracy=result.per_class_accuracy, confusion=result.confusion,
                   best_epoch=result.best_epoch, epochs_run=result.epochs_run, seconds=result.seconds,
                   best_val_top1=result.best_val_top1, metrics=result.metrics, predictions=result.predictions,
                   **extra)

    @property
    def per_class(self) -> dict[str, Any]:
        return {"per_class_accuracy": self.per_class_accuracy, "confusion": self.confusion,
                **({"predictions": self.predictions} if self.predictions else {})}

    def cas_json(self) -> dict[str, Any]:
        """top1 and top5 (the contract) and every other metric beside them."""
        return {"top1": self.top1, "top5": self.top5, **self.metrics}

    def step_json(self) -> dict[str, Any]:
        """An after_k stage's manifest outputs."""
        return {"params": self.params, "cas": self.cas_json(), "num_images": self.num_images,
                "generation_seconds": self.generation_seconds, "images_per_second": self.images_per_second,
                "per_class": self.per_class}

    @classmethod
    def from_step_json(cls, d: dict[str, Any]) -> "Score":
        return cls(top1=d["cas"]["top1"], top5=d["cas"]["top5"], num_images=d["num_images"], params=d["params"],
                   generation_seconds=d.get("generation_seconds"), images_per_second=d.get("images_per_second"),
                   metrics=_metrics(d["cas"]), **(d.get("per_class") or {}))

    def scale_json(self) -> dict[str, Any]:
        """One entry of the scaling stage's manifest outputs."""
        return {**self.cas_json(), "num_images": self.num_images, "best_epoch": self.best_epoch,
                "seconds": self.seconds, "per_class": self.per_class}

    @classmethod
    def from_scale_json(cls, d: dict[str, Any]) -> "Score":
        return cls(top1=d["top1"], top5=d["top5"], num_images=d["num_images"], best_epoch=d.get("best_epoch"),
                   seconds=d.get("seconds"), metrics=_metrics(d), **(d.get("per_class") or {}))

    def table1_row(self) -> dict[str, Any]:
        """results.json's ``steps`` entry (DESIGN.md section 4)."""
        return {"params": self.params, "cas": self.cas_json(), "num_images": self.num_images,
                "generation_seconds": self.generation_seconds}

    def table2_row(self) -> dict[str, Any]:
        return {**self.cas_json(), "num_images": self.num_images}


@dataclass
class SearchBest:
    """A search's outcome as ``best.json`` holds it (written last: it marks the search complete)."""

    phase: int
    objective: str
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    epoch: int
    encoder_epoch: int
    unet_epoch: int | None
    cas: float  # the objective's value (best val accuracy, or test accuracy for objective=test)
    eval_split: str
    test_top1: float
    test_top5: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]
    num_images: int
    generation_seconds: float | None
    images_per_second: float | None
    trial_id: str
    epochs_run: int
    num_trials: int
    num_full_budget: int
    space: dict[str, Any]
    fingerprint: str
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # of the test scores (Score.metrics)
    predictions: list[int] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchBest":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def params(self) -> dict[str, Any]:
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "epoch": self.epoch}

    def test_score(self) -> Score:
        """Its Table 1 row (after_2 / after_4): the best trial's classifier on the test split."""
        return Score(top1=self.test_top1, top5=self.test_top5, num_images=self.num_images, params=self.params,
                     generation_seconds=self.generation_seconds, per_class_accuracy=self.per_class_accuracy,
                     confusion=self.confusion, metrics=self.metrics, predictions=self.predictions)


METRIC_KEYS = ("balanced_accuracy", "macro_f1", "auc", "interval", "seeds", "sd")
SEED_METRICS = ("top1", "top5", "balanced_accuracy", "macro_f1", "auc")


def mean_over_seeds(scores: list[Score], seeds: list[int]) -> Score:
    """One row from classifiers of several seeds on the same set: top1, top5 and the other metrics are
    their means (``sd`` their standard deviations), each seed's kept in ``seeds``; the interval is the
    mean of the seeds' bootstrap intervals (the test split's noise), the predictions and per-class
    table the first seed's."""
    if len(scores) == 1:
        return scores[0]
    per_seed = [{"seed": s, **{k: v for k, v in sc.cas_json().items() if k in SEED_METRICS}}
                for s, sc in zip(seeds, scores)]

    def stat(key: str, fn: Any) -> float | None:
        vals = [p[key] for p in per_seed if p.get(key) is not None]
        return float(fn(vals)) if len(vals) == len(per_seed) else None

    import numpy as np

    first = scores[0]
    intervals = {k: [float(np.mean([sc.metrics["interval"][k][i] for sc in scores])) for i in (0, 1)]
                 for k in (first.metrics.get("interval") or {}) if all(k in (sc.metrics.get("interval") or {})
                                                                      for sc in scores)}
    metrics = {k: stat(k, np.mean) for k in SEED_METRICS if k not in ("top1", "top5")}
    metrics.update(interval=intervals, seeds=per_seed,
                   sd={k: stat(k, lambda v: np.std(v, ddof=1)) for k in SEED_METRICS})
    return dataclasses.replace(first, top1=float(np.mean([sc.top1 for sc in scores])),
                               top5=float(np.mean([sc.top5 for sc in scores])), metrics=metrics,
                               seconds=sum(sc.seconds or 0.0 for sc in scores))


def _metrics(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in METRIC_KEYS if k in d}
