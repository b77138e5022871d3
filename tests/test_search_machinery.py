"""The search machinery itself, through real Tune runs on a cheap trainable with a known landscape:
the default search (informed TPE + HyperBand) steers towards the optimum better than random search
at equal budget, and HyperBand saves at least a third of the epochs of running every trial out."""

import math
import sys

import numpy as np
import pytest
from ray import tune

from raysd.config import SearchConfig
from raysd.core.search_space import SearchSpace
from raysd.stages.tuning import INFORMED_BY, live_limit, make_scheduler, make_searcher, run_tuner

pytestmark = pytest.mark.ray

MAX_T = 27  # HyperBand with eta 3: brackets of 4 (27 epochs), 6 (9), 12 (3), 27 (1) trials
TRIALS = 30
SPACE = SearchSpace(min_inference_steps=5, max_inference_steps=50, max_guidance_scale=7.5, max_epoch=20)
OPTIMUM = {"num_inference_steps": 38, "guidance_scale": 2.0, "epoch": 15}
SEEDS = (0, 1, 2, 3, 4)


def true_value(p: dict) -> float:
    """The landscape: a narrow peak of 0.9 at OPTIMUM over a plateau of 0.3 (random search seldom
    lands on it; a search that learns where the good trials were does)."""
    d = ((p["num_inference_steps"] - OPTIMUM["num_inference_steps"]) / 45) ** 2 + \
        ((p["guidance_scale"] - OPTIMUM["guidance_scale"]) / 7.5) ** 2 + 0.5 * ((p["epoch"] - OPTIMUM["epoch"]) / 19) ** 2
    return 0.3 + 0.6 * math.exp(-d / 0.15)


def landscape_trial(config: dict) -> None:
    """Each epoch the metric approaches the landscape's value, with seeded noise (as a CAS would)."""
    params = {k: config[k] for k in OPTIMUM}
    rng = np.random.default_rng([int(config["num_inference_steps"]), int(1000 * config["guidance_scale"]),
                                 int(config["epoch"])])
    best = 0.0
    for epoch in range(1, MAX_T + 1):
        best = max(best, true_value(params) * (1 - math.exp(-epoch / 4)) + rng.normal(0, 0.01))
        tune.report({"epoch": epoch, "cas": best, "finished": epoch == MAX_T})


def search_once(tmp_path, sampler: str, seed: int) -> tuple[float, float, int, list[int]]:
    """(true value of the chosen trial, mean true value of the trials after the first ten, epochs run
    in all, informed_by of every trial in order)."""
    search = SearchConfig(num_trials=TRIALS, reduction_factor=3)
    searcher = make_searcher(SPACE.distributions(), seed=seed, concurrent=1, sampler=sampler,
                             study_name=f"landscape-{sampler}-{seed}")
    trainable = tune.with_resources(landscape_trial, {"cpu": 2})  # one at a time: a deterministic order
    grid = run_tuner(trainable, str(tmp_path / f"{sampler}-{seed}"), searcher=searcher,
                     scheduler=make_scheduler(search, MAX_T), num_samples=TRIALS,
                     max_live=live_limit(search, MAX_T, 1))
    results = sorted(grid, key=lambda r: r.metrics_dataframe["timestamp"].min())
    best = max(results, key=lambda r: r.metrics["cas"])
    epochs = sum(int(r.metrics["epoch"]) for r in results)
    later = float(np.mean([true_value(r.config) for r in results[10:]]))
    return true_value(best.config), later, epochs, [int(r.config[INFORMED_BY]) for r in results]


def test_informed_tpe_beats_random_search_and_hyperband_saves_epochs(tmp_path, ray_session):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trainable lives in this test file
    tpe, rnd, tpe_later, rnd_later, saved = [], [], [], [], []
    for seed in SEEDS:
        value, later, epochs, informed = search_once(tmp_path, "tpe", seed)
        tpe.append(value)
        tpe_later.append(later)
        saved.append(1 - epochs / (TRIALS * MAX_T))
        assert sum(n >= 5 for n in informed[10:]) > len(informed[10:]) / 2, informed  # TPE saw finished trials
        value, later, _, _ = search_once(tmp_path, "random", seed)
        rnd.append(value)
        rnd_later.append(later)
    print(f"\nlandscape: best found: TPE {np.round(tpe, 4)} (mean {np.mean(tpe):.4f}), random {np.round(rnd, 4)} "
          f"(mean {np.mean(rnd):.4f}); trials 11-{TRIALS} (TPE informed): TPE mean {np.mean(tpe_later):.4f}, random "
          f"{np.mean(rnd_later):.4f}; epochs saved by HyperBand {np.round(saved, 3)}")
    assert np.mean(tpe) > np.mean(rnd)  # a better best at equal budget
    assert np.mean(tpe_later) > np.mean(rnd_later) + 0.03  # it steers: later suggestions land nearer the peak
    assert min(saved) >= 1 / 3
