"""Search logic without Ray: spaces, one trial with stub images, the rebuilt study, importances."""

import numpy as np
import pytest
import torch

from raysd.config import load_config
from raysd.core.search_space import (PARAMS, SearchSpace, best_trial, importances, phase1_space, phase2_space,
                               rebuild_study, run_trial, trial_from_rows)


def test_spaces_have_inclusive_bounds():
    cfg = load_config("paper")
    s1 = phase1_space(cfg, 50)
    d = s1.distributions()
    assert (d["num_inference_steps"].low, d["num_inference_steps"].high) == (5, 50)
    assert (d["guidance_scale"].low, d["guidance_scale"].high) == (0.0, 7.5)
    assert (d["epoch"].low, d["epoch"].high) == (1, 50)
    s2 = phase2_space(cfg, {"num_inference_steps": 31, "guidance_scale": 2.5}, 10)
    assert (s2.min_inference_steps, s2.max_inference_steps, s2.max_guidance_scale, s2.max_epoch) == (5, 31, 5.0, 10)
    assert phase2_space(cfg, {"num_inference_steps": 3, "guidance_scale": 1.0}, 2).min_inference_steps == 3


def _toy(n, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (rng.integers(0, 40, (n, 8, 8, 3)) + 100 * y[:, None, None, None]).astype(np.uint8)
    return x, y


def test_a_trial_reads_only_its_evaluation_split_and_reports_every_epoch():
    cfg = load_config("demo", overrides={"cas.max_epochs": 4, "cas.batch_size": 16})
    reports = []
    seen = {}

    def images_fn(params):
        seen.update(params)
        x, y = _toy(48, 0)
        return x, y, 2.0

    params = {"num_inference_steps": 7, "guidance_scale": 1.5, "epoch": 2}
    run_trial(params, images_fn=images_fn, val_split=_toy(24, 1), num_classes=3, cfg=cfg, device="cpu",
              report=lambda m, s: reports.append((m, s)))
    assert seen == params and [m["epoch"] for m, _ in reports] == [1, 2, 3, 4]
    cas = [m["cas"] for m, _ in reports]
    assert cas == sorted(cas) and reports[-1][0]["finished"] and not reports[0][0]["finished"]
    assert reports[0][0]["images_per_second"] == 24.0
    # a paused trial resumes from its state: two more reports, not four
    resumed = []
    run_trial(params, images_fn=images_fn, val_split=_toy(24, 1), num_classes=3, cfg=cfg, device="cpu",
              report=lambda m, s: resumed.append(m), restored=reports[1][1])
    assert [m["epoch"] for m in resumed] == [3, 4]
    assert [m["cas"] for m in resumed] == cas[2:]


def _reports():
    out = []
    for i, (steps, ugs, ep, cas, fin) in enumerate([(5, 0.5, 1, 0.3, True), (9, 2.0, 2, 0.6, True),
                                                    (12, 4.0, 3, 0.5, False), (20, 6.0, 1, 0.4, True),
                                                    (7, 1.0, 2, 0.55, True)]):
        rows = [{"epoch": e, "cas": cas * e / 3, "finished": fin and e == 3, "classifier_seconds": 1.0,
                 "generation_seconds": 2.0, "images_per_second": 10.0} for e in range(1, (3 if fin else 1) + 1)]
        out.append(trial_from_rows(f"t{i}", {"num_inference_steps": steps, "guidance_scale": ugs, "epoch": ep}, rows,
                                   "complete" if fin else "pruned"))
    return out


def test_rebuilt_study_best_and_importances():
    trials = _reports()
    space = SearchSpace(5, 20, 7.5, 3)
    study = rebuild_study(trials, space, 0)
    assert len(study.trials) == 5 and all(t.value is not None for t in study.trials)
    best = best_trial(trials)
    assert best.trial_id == "t1" and best.best_cas == pytest.approx(0.6) and study.best_value == pytest.approx(0.6)
    imp = importances(trials, space, seed=0)
    assert set(imp["importances"]) == set(PARAMS) and sum(imp["importances"].values()) == pytest.approx(1.0)
    assert imp["num_trials"] == 5 and "all trials" in imp["basis"]  # the paper's Fig. 1: every trial, last value
    full = imp["full_budget"]
    assert full["num_trials"] == 4 and sum(full["importances"].values()) == pytest.approx(1.0)  # not the stopped one
    assert importances(trials, space, seed=0) == imp  # seeded


def test_trial_from_rows_marks_partial_trials():
    t = _reports()[2]
    assert t.epochs_run == 1 and not t.finished and t.status == "pruned" and t.seconds == 3.0


def test_a_resumed_trials_repeated_report_counts_once():
    rows = [{"epoch": 1, "cas": 0.2, "finished": False, "classifier_seconds": 1.0},
            {"epoch": 1, "cas": 0.2, "finished": False, "classifier_seconds": 1.0, "resumed": True},
            {"epoch": 2, "cas": 0.3, "finished": True, "classifier_seconds": 1.0}]
    t = trial_from_rows("t", {"num_inference_steps": 5, "guidance_scale": 1.0, "epoch": 1}, rows, "complete")
    assert t.epochs_run == 2 and t.seconds == 2.0 and t.finished and t.best_cas == 0.3


def test_the_paper_objective_reports_the_test_accuracy_of_the_best_val_weights():
    cfg = load_config("demo", overrides={"cas.max_epochs": 3, "cas.batch_size": 16})
    reports = []
    x, y = _toy(48, 0)
    run_trial({"num_inference_steps": 7, "guidance_scale": 1.5, "epoch": 2}, images_fn=lambda p: (x, y, 1.0),
              val_split=_toy(24, 1), test_split=_toy(30, 2), num_classes=3, cfg=cfg, device="cpu",
              report=lambda m, s: reports.append((m, s)))
    for m, state in reports:
        assert m["cas"] == state["best_test"] and m["val_cas"] == state["best_val"]


def test_a_reported_state_is_a_snapshot_not_the_live_trainer():
    """A paused trial's state must not move on with the epochs trained after it was reported."""
    cfg = load_config("demo", overrides={"cas.max_epochs": 3, "cas.batch_size": 16})
    states = []
    run_trial({"num_inference_steps": 7, "guidance_scale": 1.5, "epoch": 2}, images_fn=lambda p: (*_toy(48, 0), 2.0),
              val_split=_toy(24, 1), num_classes=3, cfg=cfg, device="cpu", report=lambda m, s: states.append(s))
    first, last = states[0]["model"], states[-1]["model"]
    assert states[0]["epoch"] == 1 and states[-1]["epoch"] == 3
    assert any(not torch.equal(first[k], last[k]) for k in first if first[k].is_floating_point())
