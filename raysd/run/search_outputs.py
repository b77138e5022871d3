"""What a finished search leaves in RUN/search_K/ besides Tune's experiment and the sampler's study
(``optuna.db``): ``trials.csv`` (each trial as Tune saw it: ``status`` complete, pruned or error,
beside its state and value in the study and what the study held when it was suggested),
``importance.json``, Optuna's plots and ``best.json`` (written last: it marks the search complete)."""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

from raysd.core.search_space import PARAMS, SearchSpace, TrialReport, importances, rebuild_study
from raysd.data import storage
from raysd.run.scores import SearchBest

log = logging.getLogger("raysd")


def write_trials_csv(trials: list[TrialReport], path: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "trial_id", *PARAMS, "status", "epochs_run", "last_cas", "best_cas", "study_state",
                "study_value", "informed_by", "study_complete_at_suggestion", "study_pruned_at_suggestion", "seconds",
                "generation_seconds", "images_per_second", "node", "error"])
    for t in trials:
        seen = t.study_at_suggestion or {}
        w.writerow(["" if t.index is None else t.index + 1, t.trial_id, *(t.params[k] for k in PARAMS), t.status,
                    t.epochs_run, t.last_cas, t.best_cas, t.study_state or "", _blank(t.study_value),
                    _blank(t.informed_by), _blank(seen.get("complete")), _blank(seen.get("pruned")),
                    round(t.seconds, 3), t.generation_seconds, t.images_per_second, t.node or "", t.error or ""])
    storage.write_bytes(path, buf.getvalue().encode())


def _blank(v: Any) -> Any:
    return "" if v is None else v


def write_outputs(out: str, trials: list[TrialReport], space: SearchSpace, seed: int, best: SearchBest) -> dict:
    """trials.csv, importance.json, the plots, then best.json; returns the importances."""
    imp = importances(trials, space, seed)
    write_trials_csv(trials, storage.join(out, "trials.csv"))
    storage.write_json(storage.join(out, "importance.json"), imp)
    write_plots(rebuild_study(trials, space, seed), imp, out)
    storage.write_json(storage.join(out, "best.json"), best.to_json())  # last: marks the search complete
    return imp


def write_plots(study: Any, imp: dict[str, Any], out: str) -> None:
    """Optuna's standard plots (matplotlib backend) as PNG; a plot that cannot be drawn is skipped."""
    import itertools
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    jobs = {"optimization_history": lambda: ovm.plot_optimization_history(study),
            "slice": lambda: ovm.plot_slice(study),
            "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study)}
    for a, b in itertools.combinations(PARAMS, 2):
        jobs[f"contour_{a}_{b}"] = lambda a=a, b=b: ovm.plot_contour(study, params=[a, b])
    for name, draw in jobs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
            save_figure(fig, storage.join(out, f"{name}.png"))
        except Exception as e:  # noqa: BLE001 - too few trials for a plot is not an error
            log.info("search: plot %s skipped (%s)", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        plt.close("all")
    fig, ax = plt.subplots(figsize=(5, 2.5))
    names = list(imp["importances"])
    ax.barh(names, [imp["importances"][n] for n in names], color="#4C72B0")
    ax.set_xlabel("fANOVA importance")
    ax.set_title(f"importance ({imp['num_trials']} {imp['basis']})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, storage.join(out, "importance.png"))
    plt.close("all")


def save_figure(fig: Any, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    storage.write_bytes(path, buf.getvalue())
