"""A cheap stand-in for a search trial with a known landscape, for the search-machinery tests: the
objective approaches f(IS, UGS, epoch) epoch by epoch with seeded noise, trials in part of the space
stop early (their own early stopping), and the trial follows the scheduler's protocol
(:mod:`raysd.stages.tuning`): it reports a checkpoint at every rung epoch and when it ends, and a
trial restored from a checkpoint reports that checkpoint's result again first. It reports only
there (not every epoch): what a trial does between rungs does not concern the scheduler."""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
from ray import tune

MAX_T, ETA, TRIALS = 100, 3, 50  # the paper's search: 50 trials, 100 classifier epochs, eta 3
OPTIMUM = {"num_inference_steps": 38, "guidance_scale": 2.0, "epoch": 15}
EARLY_STOP_UGS = 6.0  # trials above this guidance stop early (their val accuracy plateaus)


def true_value(p: dict) -> float:
    """A narrow peak of 0.9 at OPTIMUM over a plateau of 0.3: random search seldom lands on it, a
    search that learns where the good trials were does."""
    d = ((p["num_inference_steps"] - OPTIMUM["num_inference_steps"]) / 45) ** 2 + \
        ((p["guidance_scale"] - OPTIMUM["guidance_scale"]) / 7.5) ** 2 + \
        0.5 * ((p["epoch"] - OPTIMUM["epoch"]) / 19) ** 2
    return 0.3 + 0.6 * math.exp(-d / 0.15)


def stop_epoch(p: dict) -> int:
    """Where the trial's own early stopping ends it (MAX_T: it runs its whole budget)."""
    return 20 + int(p["num_inference_steps"]) if p["guidance_scale"] > EARLY_STOP_UGS else MAX_T


def value_at(p: dict, epoch: int) -> float:
    """The best objective so far at ``epoch``: rises towards the true value, with seeded noise."""
    rng = np.random.default_rng([int(p["num_inference_steps"]), int(1000 * p["guidance_scale"]), int(p["epoch"])])
    noise = rng.normal(0, 0.01, MAX_T + 1)
    curve = [true_value(p) * (1 - math.exp(-e / 8)) + noise[e] for e in range(1, epoch + 1)]
    return float(max(curve))


def landscape_trial(config: dict, rungs: tuple[int, ...] = ()) -> None:
    params = {k: config[k] for k in OPTIMUM}
    rungs = set(rungs)
    last = stop_epoch(params)

    def report(epoch: int) -> None:
        metrics = {"epoch": epoch, "cas": value_at(params, epoch), "finished": epoch == last}
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump(metrics, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d, open(os.path.join(d, "state.json")) as f:
            start = json.load(f)["epoch"]
        report(start)  # where it stands: the scheduler says wait, go on or stop
    for epoch in sorted(r for r in rungs | {last} if start < r <= last):
        report(epoch)
