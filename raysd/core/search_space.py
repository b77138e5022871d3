"""Search logic without Ray: the spaces of steps 2 and 4, one trial, and the study rebuilt from
the trials' reports (for the best trial and fANOVA importances).

A trial generates ``search.num_images`` class-balanced images with its (IS, UGS, epoch), trains
ResNet20 on them with the CAS protocol (callbacks on the real val split) and reports, every
classifier epoch, ``cas``: the best val accuracy so far, or, for the paper's objective
(``objective=test``, the released ``hyp_opt.py``), the test accuracy of the best-val weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from raysd.config import Config
from raysd.errors import RaysdError

PARAMS = ("num_inference_steps", "guidance_scale", "epoch")


@dataclass(frozen=True)
class SearchSpace:
    """Inclusive bounds of the three searched parameters."""

    min_inference_steps: int
    max_inference_steps: int
    max_guidance_scale: float
    max_epoch: int
    min_epoch: int = 1

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "num_inference_steps": IntDistribution(self.min_inference_steps, self.max_inference_steps),
            "guidance_scale": FloatDistribution(0.0, self.max_guidance_scale),
            "epoch": IntDistribution(self.min_epoch, self.max_epoch),
        }

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def phase1_space(cfg: Config, last_encoder_epoch: int) -> SearchSpace:
    s = cfg.search
    return SearchSpace(s.min_inference_steps, s.max_inference_steps, s.max_guidance_scale, last_encoder_epoch)


def phase2_space(cfg: Config, best1: dict[str, Any], last_unet_epoch: int) -> SearchSpace:
    """IS in [5, IS*], UGS in [0, 2 UGS*] (IS*, UGS*: phase 1's best), UNet epoch in [1, last]."""
    is_star, ugs_star = int(best1["num_inference_steps"]), float(best1["guidance_scale"])
    lo = min(cfg.search.min_inference_steps, is_star)
    return SearchSpace(lo, is_star, 2.0 * ugs_star, last_unet_epoch)


@dataclass
class TrialReport:
    """What one trial reported, rebuilt from Tune's results, and how the sampler's study recorded it."""

    trial_id: str
    params: dict[str, Any]
    epochs_run: int
    finished: bool  # ran its CAS protocol to the end (budget, own early stopping, or its bracket's full budget)
    best_cas: float | None
    last_cas: float | None
    seconds: float
    generation_seconds: float | None
    images_per_second: float | None
    status: str  # complete, pruned (cut by the scheduler) or error
    error: str | None = None
    informed_by: int | None = None  # finished (complete + pruned) trials in the study when it was suggested
    node: str | None = None  # the Ray node it ran on (last)
    index: int | None = None  # its place in the order of suggestions
    study_at_suggestion: dict[str, int] | None = None  # the study's trials by state when it was suggested
    study_state: str | None = None  # its state in the sampler's study (complete, pruned, fail)
    study_value: float | None = None


def run_trial(params: dict[str, Any], *, images_fn: Callable[[dict[str, Any]], tuple[Any, Any, float]],
              val_split: tuple[Any, Any], num_classes: int, cfg: Config, device: str,
              report: Callable[[dict[str, Any], dict[str, Any]], None], restored: dict[str, Any] | None = None,
              test_split: tuple[Any, Any] | None = None, precision: str = "auto") -> None:
    """One trial: images (cached by ``images_fn``), then classifier epochs, a report after each.

    ``test_split`` (objective=test): ``cas`` is the test accuracy of the best-val weights.
    ``restored`` is a state from an earlier report of this trial (a paused or retried trial
    continues where it stopped). ``report(metrics, state)`` receives the trainer state to save.
    """
    from raysd.core.cas import CasTrainer

    images, labels, gen_seconds = images_fn(params)
    trainer = CasTrainer((images, labels), val_split, num_classes, cfg=cfg.cas, seed=cfg.seed, device=device,
                         precision=precision, test=test_split, monitor=cfg.search.metric)
    if restored is not None:
        trainer.load_state_dict(restored)
    rate = len(labels) / gen_seconds if gen_seconds > 0 else None
    while not trainer.done:
        row = trainer.train_epoch()
        objective = trainer.best_test if test_split is not None else trainer.best_val
        metrics = {
            "epoch": int(row["epoch"]), "cas": float(objective), "val_cas": float(trainer.best_val),
            "epoch_cas": float(row["val_metric"]),
            "train_loss": float(row["train_loss"]), "finished": bool(trainer.done),
            "generation_seconds": float(gen_seconds), "images_per_second": rate,
            "classifier_seconds": float(row["seconds"]),
        }
        report(metrics, trainer.state_dict())


def trial_from_rows(trial_id: str, params: dict[str, Any], rows: list[dict[str, Any]], status: str,
                    error: str | None = None, informed_by: int | None = None, index: int | None = None,
                    study_at_suggestion: dict[str, int] | None = None) -> TrialReport:
    """A trial's report from its result rows (a resumed trial reports its checkpoint's epoch again:
    one row per epoch, the last kept)."""
    rows = list({int(r.get("epoch", 0) or 0): r for r in rows}.values())
    cas = [r["cas"] for r in rows if r.get("cas") is not None and not _nan(r["cas"])]
    last = rows[-1] if rows else {}
    return TrialReport(
        trial_id=trial_id, params={k: params[k] for k in PARAMS}, epochs_run=int(last.get("epoch", 0) or 0),
        finished=bool(last.get("finished", False)), best_cas=max(cas) if cas else None,
        last_cas=cas[-1] if cas else None, seconds=float(sum(r.get("classifier_seconds", 0.0) or 0.0 for r in rows)
                                                        + (last.get("generation_seconds") or 0.0)),
        generation_seconds=last.get("generation_seconds"), images_per_second=last.get("images_per_second"),
        status=status, error=error, informed_by=informed_by, node=last.get("node"),
        index=None if index is None else int(index), study_at_suggestion=study_at_suggestion)


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def rebuild_study(trials: list[TrialReport], space: SearchSpace, seed: int):
    """An optuna study with one COMPLETE trial per Tune trial that reported a value."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    dists = space.distributions()
    for t in trials:
        if t.best_cas is None:
            continue
        study.add_trial(optuna.trial.create_trial(params=t.params, distributions=dists, value=t.best_cas,
                                                  user_attrs={"trial_id": t.trial_id, "finished": t.finished,
                                                              "epochs_run": t.epochs_run}))
    return study


def best_trial(trials: list[TrialReport]) -> TrialReport:
    """Highest CAS; a full-budget trial wins a tie; then the earliest trial."""
    scored = [t for t in trials if t.best_cas is not None]
    if not scored:
        raise RaysdError("search: no trial reported a CAS value; see the trials' errors in trials.csv")
    return max(scored, key=lambda t: (t.best_cas, t.finished))


def fanova(trials: list[TrialReport], space: SearchSpace, seed: int) -> dict[str, float]:
    """Normalised fANOVA importances (seeded) of the trials' values; even when nothing varies."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    values = {p: 0.0 for p in PARAMS}
    if len(trials) >= 2 and len({t.best_cas for t in trials}) > 1:
        varying = [p for p in PARAMS if len({t.params[p] for t in trials}) > 1]
        if varying:
            raw = optuna.importance.get_param_importances(rebuild_study(trials, space, seed), params=varying,
                                                          evaluator=FanovaImportanceEvaluator(seed=seed),
                                                          normalize=True)
            values.update({k: float(v) for k, v in raw.items()})
    total = sum(values.values())
    if total <= 0:  # no signal (one trial, or all equal): no parameter explains anything; spread evenly
        return {k: 1.0 / len(PARAMS) for k in PARAMS}
    return {k: v / total for k, v in values.items()}


def importances(trials: list[TrialReport], space: SearchSpace, seed: int) -> dict[str, Any]:
    """fANOVA importances on two bases, each named.

    ``importances``: every trial at its last reported value, as the paper's Fig. 1 (its search
    never pruned, so all of its trials ran the full budget). ``full_budget``: only the trials
    that ran the full classifier protocol (survivors of the scheduler and the unprunable ones).
    """
    scored = [t for t in trials if t.last_cas is not None]
    last = [dataclasses.replace(t, best_cas=t.last_cas) for t in scored]  # the study takes best_cas as the value
    full = [t for t in scored if t.finished]
    return {"importances": fanova(last, space, seed), "num_trials": len(last),
            "basis": "all trials at their last reported value (the paper's Fig. 1)",
            "full_budget": {"importances": fanova(full, space, seed), "num_trials": len(full),
                            "basis": "trials that ran the full classifier budget"},
            "evaluator": "fanova", "seed": seed}


# --------------------------------------------------------------------------------------------
# Where the schedulers may stop or pause a trial (checkpoint there)


def milestones(cfg: Config) -> set[int]:
    """Epochs where HyperBand or ASHA may pause or stop a trial (it reports a checkpoint there),
    every 10th (a killed trial loses at most 10 epochs) and the last."""
    from raysd.core.hyperband import milestones as hyperband_rungs

    eta, max_t = cfg.search.reduction_factor, cfg.cas.epoch_limit
    out = {max_t, *range(10, max_t + 1, 10)}
    if cfg.search.scheduler == "hyperband":
        out |= hyperband_rungs(max_t, eta)
    else:
        g = cfg.search.grace_period  # ASHA rungs: grace * eta^k
        while g < max_t:
            out.add(int(g))
            g *= eta
    return {m for m in out if 1 <= m <= max_t}
