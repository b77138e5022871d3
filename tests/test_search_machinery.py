"""The search machinery at the paper's settings (50 trials, 100 classifier epochs, eta 3) through real
Tune runs of a cheap trainable on a known landscape (tests/search_landscape.py): at 1, 2 and 8
trials at once every trial reaches the sampler's study once with the state of what it did, no
bracket hangs and HyperBand saves at least a third of the epochs; one at a time, informed TPE lands
nearer the optimum than random search at equal budget, and a search killed and restored ends as an
undisturbed one does."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ray import tune

import search_landscape as L
from conftest import REPO
from raysd.config import SearchConfig
from raysd.core import hyperband as hb
from raysd.core.search_space import SearchSpace
from raysd.stages.tuning import (INFORMED_BY, TRIAL_INDEX, TrialLogger, load_study, make_search, rung_epochs,
                                 run_tuner)

pytestmark = pytest.mark.ray

SPACE = SearchSpace(min_inference_steps=5, max_inference_steps=50, max_guidance_scale=7.5, max_epoch=20)
PARAMS = ("num_inference_steps", "guidance_scale", "epoch")
BUDGET_S = 400  # a search that has not ended by then hangs


def run_search(out: Path, *, concurrency: int, sampler: str = "tpe", seed: int = 0, scheduler: str = "hyperband"):
    """One search; returns {index: outcome} with the study's state and value for each trial."""
    search = SearchConfig(num_trials=L.TRIALS, reduction_factor=L.ETA, scheduler=scheduler)
    searcher, sched = make_search(SPACE.distributions(), search, max_t=L.MAX_T, seed=seed, capacity=concurrency,
                                  study_name="landscape", sampler=sampler, export_to=str(out / "optuna.db"))
    trainable = tune.with_resources(tune.with_parameters(L.landscape_trial, rungs=tuple(rung_epochs(search, L.MAX_T))),
                                    {"cpu": 2 / concurrency})
    grid = run_tuner(trainable, str(out), searcher=searcher, scheduler=sched, num_samples=L.TRIALS,
                     time_budget_s=BUDGET_S, callbacks=[TrialLogger()])
    return outcomes(grid, out)


def outcomes(grid, out: Path) -> dict[int, dict]:
    study = {t.user_attrs["tune_trial_id"]: t for t in load_study(str(out / "optuna.db"), "landscape").trials}
    got = {}
    for r in grid:
        rows = r.metrics_dataframe.to_dict("records")
        last = rows[-1]
        st = study[r.metrics["trial_id"]]
        got[int(r.config[TRIAL_INDEX])] = {
            "params": {k: r.config[k] for k in PARAMS}, "epochs": int(last["epoch"]), "cas": float(last["cas"]),
            "tune": "complete" if last["finished"] else "pruned", "error": r.error is not None,
            "study": st.state.name.lower(), "value": st.value, "informed_by": r.config[INFORMED_BY]}
    return got


def check_states_and_savings(got: dict[int, dict]) -> float:
    """Every trial ended, as the study says; returns the share of epochs HyperBand saved."""
    assert sorted(got) == list(range(L.TRIALS)), sorted(got)  # all 50, each once: nothing hung
    for i, t in got.items():
        assert not t["error"] and t["study"] == t["tune"], (i, t)
        if t["tune"] == "complete":  # ran its protocol: its budget, its own early stop or its bracket's last rung
            assert t["value"] == pytest.approx(t["cas"]) and t["epochs"] == L.stop_epoch(t["params"]), (i, t)
    saved = 1 - sum(t["epochs"] for t in got.values()) / (L.TRIALS * L.MAX_T)
    assert saved >= 1 / 3, saved
    return saved


@pytest.fixture(scope="module")
def register(ray_session):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(L)  # the trainable lives in the tests folder


def test_the_plan_at_the_paper_settings():
    plan = hb.plan(L.TRIALS, L.MAX_T, L.ETA)
    assert [(b.s, b.size, b.rungs) for b in plan] == [(4, 28, (1, 4, 11, 33)), (3, 12, (4, 11, 33)),
                                                      (2, 5, (11, 33)), (1, 3, (33,)), (0, 2, ())]
    assert sum(n for _, n, _ in hb.band(L.MAX_T, L.ETA)) == 143  # one whole band; 50 trials get its shares


@pytest.mark.parametrize("concurrency", [1, 2, 8])
def test_states_savings_and_no_hang(tmp_path, register, concurrency):
    got = run_search(tmp_path, concurrency=concurrency)
    saved = check_states_and_savings(got)
    cut = sum(t["tune"] == "pruned" for t in got.values())
    print(f"\nconcurrency {concurrency}: {cut} of {L.TRIALS} trials cut at a rung, {saved:.1%} of the epochs saved")
    assert cut >= L.TRIALS // 2
    if concurrency == 1:  # each suggestion saw every trial finished before it: bracket 1 (28) first, then informed
        assert [got[i]["informed_by"] for i in (0, 27)] == [0, 0] and got[28]["informed_by"] == 28


def test_asha_cuts_on_the_same_landscape(tmp_path, register):
    got = run_search(tmp_path, concurrency=1, scheduler="asha")
    check_states_and_savings(got)
    assert sum(t["tune"] == "pruned" for t in got.values()) >= L.TRIALS // 3


def test_informed_tpe_lands_nearer_the_optimum_than_random_search(tmp_path, register):
    means = {}
    for sampler in ("tpe", "random"):
        got = run_search(tmp_path / sampler, concurrency=1, sampler=sampler)
        means[sampler] = float(np.mean([L.true_value(got[i]["params"]) for i in range(10, L.TRIALS)]))
        best = max(got.values(), key=lambda t: t["value"] if t["study"] == "complete" else -1)
        means[f"{sampler}_best"] = L.true_value(best["params"])
    print(f"\ntrials 11-50 (true value): TPE {means['tpe']:.4f}, random {means['random']:.4f}; best complete trial: "
          f"TPE {means['tpe_best']:.4f}, random {means['random_best']:.4f}")
    assert means["tpe"] > means["random"] + 0.03


KILLED = r'''
import sys
sys.path.insert(0, "tests")
import ray, ray.cloudpickle
from pathlib import Path
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
import search_landscape
ray.cloudpickle.register_pickle_by_value(search_landscape)
import test_search_machinery as T
T.run_search(Path(sys.argv[1]), concurrency=1)
print("DONE", flush=True)
'''


def test_a_search_killed_and_restored_ends_as_an_undisturbed_one(tmp_path, register, private_ray_env):
    env, kill_cluster = private_ray_env
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    done, deadline = 0, time.time() + 300
    for line in proc.stdout:  # kill the driver and its cluster once a third of the trials have ended
        done += "[raysd] trial " in line
        if done >= 17 or time.time() > deadline:
            break
    kill_cluster(proc)
    assert done >= 17 and not (out / "optuna.db").exists()
    r = subprocess.run([sys.executable, "-c", KILLED, str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    restored = outcomes(tune.Tuner.restore(str(out / "tune"), trainable=L.landscape_trial).get_results(), out)
    undisturbed = run_search(tmp_path / "undisturbed", concurrency=1)
    keep = ("params", "epochs", "tune", "study", "value", "informed_by")
    assert {i: {k: t[k] for k in keep} for i, t in restored.items()} == {
        i: {k: t[k] for k in keep} for i, t in undisturbed.items()}


@pytest.mark.nightly  # five seeds of each: ~4 min on 2 cores
def test_informed_tpe_against_random_search_over_five_seeds(tmp_path, register):
    rows = []
    for seed in range(5):
        row = {}
        for sampler in ("tpe", "random"):
            got = run_search(tmp_path / f"{sampler}-{seed}", concurrency=1, sampler=sampler, seed=seed)
            row[sampler] = float(np.mean([L.true_value(got[i]["params"]) for i in range(10, L.TRIALS)]))
            best = max(got.values(), key=lambda t: t["value"] if t["study"] == "complete" else -1)
            row[f"{sampler}_best"] = L.true_value(best["params"])
        rows.append(row)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    print(f"\nfive seeds, trials 11-50: TPE {[round(r['tpe'], 4) for r in rows]} (mean {mean['tpe']:.4f}), random "
          f"{[round(r['random'], 4) for r in rows]} (mean {mean['random']:.4f}); best complete trial: TPE "
          f"{mean['tpe_best']:.4f}, random {mean['random_best']:.4f}")
    assert all(r["tpe"] > r["random"] for r in rows) and mean["tpe_best"] >= mean["random_best"]
