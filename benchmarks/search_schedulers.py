"""Which HyperBand for the searches, by measurement: raysd's synchronous HyperBand on Tune's scheduler
interface against Ray's ``HyperBandScheduler`` (through its public interface) and ASHA, at the
paper's settings (50 trials, 100 classifier epochs, eta 3), each with raysd's informed TPE, on the
cheap landscape trainable of the tests (reporting every epoch, so each scheduler sees its own rungs).

    python benchmarks/search_schedulers.py [--concurrency 1 2 8] [--seed 0]

Per scheduler and concurrency: trials cut at a rung, epochs saved against running every trial out,
whether the sampler's study states equal what Tune saw (complete / pruned), how many suggestions
were informed (made after at least one trial had finished), the mean true value of trials 11-50,
the best complete trial's true value, and seconds. A search that has not ended after the time
budget hangs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import table  # noqa: E402

BUDGET_S = 600


def one(kind: str, concurrency: int, seed: int, out: Path) -> list[object]:
    import search_landscape as L
    from ray import tune
    from ray.tune.schedulers import HyperBandScheduler

    from raysd.config import SearchConfig
    from raysd.core.search_space import SearchSpace
    from raysd.stages.tuning import INFORMED_BY, TRIAL_INDEX, load_study, make_search, run_tuner

    space = SearchSpace(5, 50, 7.5, 20).distributions()
    search = SearchConfig(num_trials=L.TRIALS, reduction_factor=L.ETA, scheduler="asha" if kind == "asha" else "hyperband")
    searcher, sched = make_search(space, search, max_t=L.MAX_T, seed=seed, capacity=concurrency, study_name="bench",
                                  export_to=str(out / "optuna.db"))
    if kind == "ray-hyperband":  # Ray's own synchronous HyperBand; the book then tracks no waiting trials
        searcher.book.hyperband = None
        sched = HyperBandScheduler(time_attr="epoch", metric="cas", mode="max", max_t=L.MAX_T,
                                   reduction_factor=L.ETA)
    trainable = tune.with_resources(tune.with_parameters(L.landscape_trial, rungs=tuple(range(1, L.MAX_T + 1))),
                                    {"cpu": 2 / concurrency})
    t0 = time.perf_counter()
    grid = run_tuner(trainable, str(out), searcher=searcher, scheduler=sched, num_samples=L.TRIALS,
                     time_budget_s=BUDGET_S)
    seconds = time.perf_counter() - t0
    rows = {int(r.config[TRIAL_INDEX]): (r.config, r.metrics_dataframe.to_dict("records")) for r in grid
            if r.metrics_dataframe is not None}
    study_path = out / "optuna.db"  # written when the last trial is told: every trial ended
    ended = study_path.exists()
    states_ok = "no study (not all trials ended)"
    if study_path.exists():
        by_id = {t.user_attrs["tune_trial_id"]: t.state.name.lower() for t in load_study(str(study_path), "bench").trials}
        states_ok = str(all(by_id.get(r.metrics["trial_id"]) == ("complete" if r.metrics["finished"] else "pruned")
                            for r in grid))
    epochs = sum(int(rec[-1]["epoch"]) for _, rec in rows.values())
    cut = sum(not rec[-1]["finished"] for _, rec in rows.values())
    informed = sum(int(cfg[INFORMED_BY]) > 0 for cfg, _ in rows.values())
    later = float(np.mean([L.true_value(rows[i][0]) for i in range(10, L.TRIALS) if i in rows]))
    complete = [(rec[-1]["cas"], L.true_value(cfg)) for cfg, rec in rows.values() if rec[-1]["finished"]]
    best = max(complete)[1] if complete else float("nan")
    return [kind, concurrency, "yes" if ended else f"no (hung after {BUDGET_S} s)", cut,
            f"{1 - epochs / (L.TRIALS * L.MAX_T):.1%}", states_ok, informed, later, best, seconds]


def main() -> None:
    import ray
    import ray.cloudpickle

    import search_landscape

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(search_landscape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.concurrency:
            for kind in ("raysd-hyperband", "ray-hyperband", "asha"):
                rows.append(one(kind, c, args.seed, Path(tmp) / f"{kind}-{c}"))
                print(rows[-1], flush=True)
    print(table(f"Schedulers at the paper's settings (50 trials, max_t 100, eta 3), TPE seed {args.seed}",
                ["scheduler", "at once", "all ended", "cut", "epochs saved", "study = Tune", "informed",
                 "mean true value 11-50", "best complete", "seconds"], rows))


if __name__ == "__main__":
    main()
