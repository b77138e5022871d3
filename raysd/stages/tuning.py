"""The Ray Tune machinery of the searches, apart from what a raysd trial does: a TPE searcher that
is informed, the schedulers, and the tuner (also used on its own by the search-machinery test).

Why the searcher is informed: Tune keeps up to ``max_concurrent_trials`` trials *pending*, and a
synchronous HyperBand needs that limit at its largest bracket (PAUSED trials count against it),
so Tune used to ask the searcher for a whole bracket of configurations (50 with the paper's
settings) before any trial had reported: TPE, random until it has seen 10 finished trials,
never steered. Here at most one trial is pending (``TUNE_MAX_PENDING_TRIALS_PG``): a
configuration is suggested only when a trial can start, once the trials before it have run as
far as the resources allowed. Trials the scheduler stops reach Optuna as PRUNED with their
intermediate values (its semantics for pruned trials: ranked below completed ones).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from ray import tune
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler
from ray.tune.search.optuna import OptunaSearch

from raysd.config import SearchConfig
from raysd.core.search_space import PARAMS, hyperband_brackets
from raysd.data import storage

log = logging.getLogger("raysd")

INFORMED_BY = "informed_by"  # config key a suggested trial carries: finished trials the searcher had seen


class InformedOptunaSearch(OptunaSearch):
    """OptunaSearch that records, with every suggestion, how many finished trials the sampler
    had received, and tells trials stopped before their full budget as PRUNED."""

    def suggest(self, trial_id: str) -> Any:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config = {**config, INFORMED_BY: len(self._completed_trials)}
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not result or result.get("finished", True) or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        from optuna.trial import TrialState

        try:  # stopped by the scheduler: pruned, its reported intermediate values kept
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        finally:
            self._completed_trials.add(trial_id)


def make_searcher(space: dict[str, Any], *, seed: int, concurrent: int, study_name: str,
                  storage_url: str | None = None, sampler: str = "tpe") -> InformedOptunaSearch:
    """Seeded multivariate TPE (the default) or random search, on Optuna distributions ``space``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    chosen = (optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=concurrent > 1)
              if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    return InformedOptunaSearch(space=space, metric="cas", mode="max", sampler=chosen, study_name=study_name,
                                storage=optuna.storages.RDBStorage(storage_url) if storage_url else None)


class FixedHyperBand(HyperBandScheduler):
    """Ray 2.60's synchronous HyperBandScheduler, made to work with trials suggested one at a time.

    Ray's halves a bracket as soon as every trial *added so far* reached the rung, which assumes
    all of a bracket's trials are created up front. Suggested lazily (so TPE is informed), a
    bracket's first trial would reach its rung alone and be "halved" with itself. Here a trial at
    its rung waits (PAUSED, its resources freed for the next suggestion) until its bracket is
    filled, or no more trials will come. Also: when a trial ends (early stopping) and its bracket is
    thereby finished, the bracket's PAUSED trials are stopped (Ray leaves them waiting forever)."""

    def _ready(self, tune_controller, bracket) -> bool:  # noqa: ANN001
        return bracket.filled() or tune_controller._search_alg.is_finished()

    def on_trial_result(self, tune_controller, trial, result):  # noqa: ANN001
        bracket, _ = self._trial_info[trial]
        bracket.update_trial_stats(trial, result)
        if bracket.continue_trial(trial):
            return self.CONTINUE
        if not self._ready(tune_controller, bracket):
            return self.PAUSE
        return self._process_bracket(tune_controller, bracket)

    def on_trial_remove(self, tune_controller, trial):  # noqa: ANN001
        bracket, _ = self._trial_info[trial]
        bracket.cleanup_trial(trial)
        if bracket.finished():
            bracket.cleanup_full(tune_controller)
        elif not bracket.is_being_processed and self._ready(tune_controller, bracket):
            self._process_bracket(tune_controller, bracket)

    def choose_trial_to_run(self, tune_controller):  # noqa: ANN001
        """Once every trial exists and none can run, settle the brackets that waited to fill and
        never will (also after a restore, where trials that ended before it come back listed)."""
        from ray.tune.experiment import Trial

        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None or not tune_controller._search_alg.is_finished():
            return trial
        for bracket in (b for band in self._hyperbands for b in band if b is not None):
            for t in list(bracket.current_trials()):
                if t.status in (Trial.TERMINATED, Trial.ERROR):
                    bracket.cleanup_trial(t)
            if bracket.current_trials() and bracket.cur_iter_done():
                if bracket.finished():
                    bracket.cleanup_full(tune_controller)
                else:
                    self._process_bracket(tune_controller, bracket)
        return super().choose_trial_to_run(tune_controller)


def make_scheduler(search: SearchConfig, max_t: int) -> Any:
    """Synchronous HyperBand (the paper's "Hyperband pruning" on Ray), or ASHA: with
    ``search.brackets > 1`` the asynchronous HyperBand of Optuna's HyperbandPruner."""
    if search.scheduler == "hyperband":
        return FixedHyperBand(time_attr="epoch", max_t=max_t, reduction_factor=search.reduction_factor)
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=search.grace_period,
                         reduction_factor=search.reduction_factor, brackets=search.brackets)


def live_limit(search: SearchConfig, max_t: int, running: int) -> int:
    """Trials that may be alive (running, pending or PAUSED) at once: a synchronous HyperBand
    bracket can only fill, and prune, when all of its trials may be alive."""
    limit = running
    if search.scheduler == "hyperband":
        limit = max(running, max(hyperband_brackets(max_t, search.reduction_factor).values(), default=1))
    return min(limit, search.num_trials)


@contextlib.contextmanager
def one_pending_trial() -> Iterator[None]:
    """Tune asks the searcher for a trial only when none is waiting to start (read at Tune's start)."""
    old = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)
        else:
            os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = old


def run_tuner(trainable: Any, out: str, *, searcher: Any, scheduler: Any, num_samples: int, max_live: int,
              max_failures: int = 0, callbacks: list | None = None) -> Any:
    """Run (or resume, when ``out/tune`` holds an interrupted experiment) a Tune experiment."""
    fs, exp_parent = storage.filesystem(out)
    exp_path = storage.join(out, "tune")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with one_pending_trial():
        if tune.Tuner.can_restore(exp_path):
            log.info("resuming the interrupted search in %s", exp_path)
            return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True).fit()
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric="cas", mode="max", search_alg=searcher, scheduler=scheduler,
                                        num_samples=num_samples, max_concurrent_trials=max_live, reuse_actors=True),
            run_config=tune.RunConfig(name="tune", storage_path=exp_parent, storage_filesystem=fs,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=callbacks or [], verbose=1))
        return tuner.fit()


class TrialLogger(tune.Callback):
    """One line per finished trial: parameters, CAS, epochs, seconds, how informed its suggestion was."""

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        r = trial.last_result or {}
        p = {k: trial.config.get(k) for k in PARAMS}
        print(f"[raysd] trial {trial.trial_id}: IS={p['num_inference_steps']} UGS={p['guidance_scale']:.3f} "
              f"epoch={p['epoch']}: CAS {r.get('cas', float('nan')):.4f} after {r.get('epoch', 0)} "
              f"epochs ({'full' if r.get('finished') else 'stopped early'}), {r.get('time_total_s', 0):.1f}s; "
              f"suggested after {trial.config.get(INFORMED_BY, '?')} finished trial(s)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
        print(f"[raysd] trial {trial.trial_id} failed: {trial.error_file}", flush=True)
