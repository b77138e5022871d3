"""The Ray Tune machinery of the searches, apart from what a raysd trial does: an Optuna searcher
that is told what each trial did, synchronous HyperBand on Tune's scheduler interface (or Ray's
ASHA), and the tuner (also used on its own by the search-machinery tests). Public interfaces only:
Tune's ``Searcher`` and ``TrialScheduler``, Optuna's ask-and-tell.

* **TPE learns from what each trial did.** The searcher keeps its own Optuna study (in memory,
  saved with the searcher's state, so a restored search has exactly the study its trials had) and
  tells it every trial once: COMPLETE with its objective when the trial ran its protocol to the end
  (its budget, its own early stopping, or the last rung of its bracket, after which it runs the
  whole budget); PRUNED with its intermediate values when the scheduler cut it; FAIL on an error.
  It reads the trial's last result itself, so a trial Tune stops while paused (no result passed)
  is told what it did, not PRUNED by default. The study is written to ``optuna.db`` (SQLite) in the
  search directory when the last trial is told (on an object store too, uploaded as one file).
* **TPE is informed.** A configuration is suggested only when a trial can start now: fewer trials
  running (or promoted, waiting to resume) than the cluster runs at once. So each suggestion is made
  from every trial finished before it started; each one records how many COMPLETE, PRUNED and
  FAIL trials the study held then.
* **HyperBand prunes whatever the concurrency.** :mod:`raysd.core.hyperband` assigns trials to
  brackets by suggestion order and decides a rung when all of its bracket's members reached it or
  ended; members that arrive early wait paused, holding no resources. Its state is saved with the
  searcher's, so a restored search keeps its brackets and decisions.

Trial protocol (what the scheduler relies on): a trial reports a checkpoint at every rung epoch and
when it ends, with ``epoch``, the objective and ``finished`` (True when its own protocol ended it); a
trial restored from a checkpoint first reports that checkpoint's result again (with the checkpoint),
so the scheduler can tell it to wait, go on or stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
from typing import Any, Iterator

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from raysd.config import SearchConfig
from raysd.core import hyperband as hb
from raysd.core.search_space import PARAMS
from raysd.data import storage
from raysd.errors import RaysdError

log = logging.getLogger("raysd")

INFORMED_BY = "informed_by"  # config key: finished (COMPLETE + PRUNED) trials in the study at the suggestion
TRIAL_INDEX = "trial_index"  # config key: the order of the suggestion (HyperBand's bracket assignment)
STUDY_AT_SUGGESTION = "study_at_suggestion"  # config key: {"complete", "pruned", "fail", "running"} then
METRIC = "cas"


class SearchBook:
    """What the searcher and the scheduler share: which trial is which (by suggestion index), which
    ended, HyperBand's state, and how many trials may run at once. Plain data, pickled with the
    searcher's state and restored in place (the scheduler keeps its reference)."""

    def __init__(self, capacity: int, hyperband: hb.HyperBandState | None = None):
        self.capacity = capacity
        self.hyperband = hyperband
        self.index: dict[str, int] = {}  # Tune trial id -> suggestion index
        self.ended: set[int] = set()
        self.promoted: set[int] = set()  # decided to go on, paused until resumed

    def active(self) -> int:
        """Trials running, starting, or promoted and waiting to resume (not: paused at an open rung)."""
        waiting = self.hyperband.waiting() if self.hyperband is not None else set()
        return len(set(self.index.values()) - self.ended - waiting)

    def can_start(self) -> bool:
        return self.active() < self.capacity

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class InformedSearch(Searcher):
    """Seeded Optuna (TPE or random) through ask-and-tell, told each trial's real outcome once."""

    def __init__(self, space: dict[str, Any], *, sampler: Any, book: SearchBook, num_trials: int,
                 study_name: str, export_to: str | None = None):
        import optuna

        super().__init__(metric=METRIC, mode="max")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space, self.book, self.num_trials, self.export_to = space, book, num_trials, export_to
        self.storage = optuna.storages.InMemoryStorage()
        self.study = optuna.create_study(storage=self.storage, sampler=sampler, study_name=study_name,
                                         direction="maximize")
        self.asked: dict[str, Any] = {}  # Tune trial id -> its optuna Trial
        self.last: dict[str, dict[str, Any]] = {}  # Tune trial id -> its last result
        self.told: set[str] = set()
        self.reported: dict[str, set[int]] = {}  # Tune trial id -> epochs reported to the study
        self.counts_at_suggestion: list[dict[str, int]] = []

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return (metric in (None, METRIC)) and (mode in (None, "max"))

    def study_counts(self) -> dict[str, int]:
        from optuna.trial import TrialState

        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        return {"complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
                "fail": states.count(TrialState.FAIL), "running": states.count(TrialState.RUNNING)}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self.asked and not self.book.can_start():
            return None  # not now: suggested when a trial can start, from everything finished by then
        if trial_id not in self.asked:
            index = len(self.book.index)
            counts = self.study_counts()
            trial = self.study.ask(fixed_distributions=self.space)
            trial.set_user_attr("tune_trial_id", trial_id)
            trial.set_user_attr(TRIAL_INDEX, index)
            self.asked[trial_id] = trial
            self.book.index[trial_id] = index
            self.counts_at_suggestion.append(counts)
            log.info("search: trial %d (%s) suggested from a study of %d complete, %d pruned, %d failed trials "
                     "(%d running)", index + 1, trial_id, counts["complete"], counts["pruned"], counts["fail"],
                     counts["running"])
        trial, index = self.asked[trial_id], self.book.index[trial_id]
        counts = self.counts_at_suggestion[index]
        return {**trial.params, TRIAL_INDEX: index, INFORMED_BY: counts["complete"] + counts["pruned"],
                STUDY_AT_SUGGESTION: counts}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self.told or trial_id not in self.asked:
            return
        self.last[trial_id] = {k: result.get(k) for k in ("epoch", METRIC, "finished")}
        step, seen = int(result["epoch"]), self.reported.setdefault(trial_id, set())
        if result.get(METRIC) is not None and step not in seen:  # a resumed trial reports its checkpoint again
            self.asked[trial_id].report(float(result[METRIC]), step)
            seen.add(step)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if trial_id in self.told or trial_id not in self.asked:
            return  # told once; a trial of another session of this search is not ours
        if result:
            self.on_trial_result(trial_id, result)
        last = self.last.get(trial_id, {})
        if error:
            self.study.tell(self.asked[trial_id], state=TrialState.FAIL)
        elif last.get("finished") and last.get(METRIC) is not None:
            self.study.tell(self.asked[trial_id], float(last[METRIC]), state=TrialState.COMPLETE)
        else:  # stopped before its protocol ended: the scheduler cut it
            self.study.tell(self.asked[trial_id], state=TrialState.PRUNED)
        self.told.add(trial_id)
        self.book.ended.add(self.book.index[trial_id])
        if len(self.told) == self.num_trials and self.export_to:
            export_study(self.study, self.storage, self.export_to)

    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k != "book" and not k.startswith("_")}
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"searcher": state, "book": self.book.state()}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)  # noqa: S301 - Tune's own searcher state, written by save() above
        self.__dict__.update(saved["searcher"])
        self.book.load(saved["book"])  # in place: the scheduler holds the same book


def export_study(study: Any, storage_: Any, dest: str) -> None:
    """The study as an SQLite file at ``dest`` (a local path or an object-store URI)."""
    import optuna

    with tempfile.TemporaryDirectory(prefix="raysd-study-") as tmp:
        local = os.path.join(tmp, "optuna.db")
        optuna.copy_study(from_study_name=study.study_name, from_storage=storage_, to_storage=f"sqlite:///{local}")
        storage.put_file(local, dest)


def load_study(path: str, study_name: str) -> Any:
    """The study a search exported (a local path or an object-store URI)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="raysd-study-") as tmp:
        local = os.path.join(tmp, "optuna.db")
        with open(local, "wb") as f:
            f.write(storage.read_bytes(path))
        src = optuna.storages.RDBStorage(f"sqlite:///{local}")
        mem = optuna.storages.InMemoryStorage()
        optuna.copy_study(from_study_name=study_name, from_storage=src, to_storage=mem)
        src.engine.dispose()
        return optuna.load_study(study_name=study_name, storage=mem)


class SyncHyperBand(TrialScheduler):
    """Synchronous HyperBand (:mod:`raysd.core.hyperband`) on Tune's scheduler interface: a trial at
    an open rung pauses (PAUSE frees its resources), the members a rung keeps resume first, the
    ones it cuts stop (PRUNED)."""

    def __init__(self, book: SearchBook):
        super().__init__()
        self.book = book
        self.trials: dict[int, Trial] = {}  # suggestion index -> Tune trial (this session's)

    @property
    def state(self) -> hb.HyperBandState:
        assert self.book.hyperband is not None
        return self.book.hyperband

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return (metric in (None, METRIC)) and (mode in (None, "max"))

    @property
    def metric(self) -> str:
        return METRIC

    @property
    def supports_buffered_results(self) -> bool:
        return False  # a trial must stop at its rung, not run on through buffered epochs

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self.trials[int(trial.config[TRIAL_INDEX])] = trial

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        index, epoch = int(trial.config[TRIAL_INDEX]), int(result["epoch"])
        if result.get("finished") or not self.state.is_rung(index, epoch):
            return self.CONTINUE
        decision, promoted, cut = self.state.arrive(index, epoch, float(result[METRIC]))
        self.act(tune_controller, promoted, cut, current=index)
        if decision == "continue":
            self.book.promoted.discard(index)
            return self.CONTINUE
        return self.STOP if decision == "stop" else self.PAUSE

    def trial_ended(self, tune_controller: Any, trial: Trial) -> None:
        """A trial ended (its own stop, an error, a cut): rungs it no longer blocks may settle."""
        promoted, cut = self.state.end(int(trial.config[TRIAL_INDEX]))
        self.act(tune_controller, promoted, cut, current=int(trial.config[TRIAL_INDEX]))

    def act(self, tune_controller: Any, promoted: list[int], cut: list[int], current: int) -> None:
        """Carry out what a rung decided: promoted trials resume first, cut ones (paused) stop."""
        self.book.promoted.update(i for i in promoted if i != current)
        for i in cut:
            t = self.trials.get(i)
            if i != current and t is not None and t.status in (Trial.PAUSED, Trial.PENDING):
                tune_controller.stop_trial(t)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self.trial_ended(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.trial_ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.trial_ended(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """Promoted trials first (they finish brackets), then new ones; never one waiting at a rung."""
        trials = sorted(tune_controller.get_trials(), key=lambda t: int(t.config.get(TRIAL_INDEX, 0)))
        waiting = self.state.waiting()
        for t in trials:
            if t.status == Trial.PAUSED and int(t.config[TRIAL_INDEX]) in self.book.promoted:
                return t
        for t in trials:
            if t.status == Trial.PENDING and int(t.config[TRIAL_INDEX]) not in waiting:
                return t
        return None

    def debug_string(self) -> str:
        s = self.state
        return (f"HyperBand: {len(s.brackets)} brackets, {len(s.ended - s.cut)} trials done, {len(s.cut)} cut, "
                f"{len(s.waiting())} waiting at a rung")


def make_search(space: dict[str, Any], search: SearchConfig, *, max_t: int, seed: int, capacity: int,
                study_name: str, sampler: str = "tpe", export_to: str | None = None) -> tuple[Any, Any]:
    """(searcher, scheduler) of a search: seeded multivariate TPE (or random search) and synchronous
    HyperBand (or ASHA; with ``search.brackets > 1`` the asynchronous HyperBand of Optuna's
    HyperbandPruner), sharing one book."""
    import optuna

    state = (hb.HyperBandState(hb.plan(search.num_trials, max_t, search.reduction_factor), search.reduction_factor)
             if search.scheduler == "hyperband" else None)
    book = SearchBook(capacity, state)
    chosen = (optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=capacity > 1)
              if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    searcher = InformedSearch(space, sampler=chosen, book=book, num_trials=search.num_trials, study_name=study_name,
                              export_to=export_to)
    if state is not None:
        return searcher, SyncHyperBand(book)
    return searcher, ASHAScheduler(time_attr="epoch", metric=METRIC, mode="max", max_t=max_t,
                                   grace_period=search.grace_period, reduction_factor=search.reduction_factor,
                                   brackets=search.brackets)


def rung_epochs(search: SearchConfig, max_t: int) -> set[int]:
    """Epochs where the scheduler may pause or stop a trial (a trial reports a checkpoint there)."""
    if search.scheduler == "hyperband":
        return hb.milestones(max_t, search.reduction_factor)
    out, g = set(), search.grace_period
    while g < max_t:
        out.add(int(g))
        g *= search.reduction_factor
    return out


@contextlib.contextmanager
def one_pending_trial() -> Iterator[None]:
    """Tune starts one trial's actor at a time (read at Tune's start)."""
    old = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)
        else:
            os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = old


def run_tuner(trainable: Any, out: str, *, searcher: Any, scheduler: Any, num_samples: int, max_failures: int = 0,
              callbacks: list | None = None, time_budget_s: float | None = None) -> Any:
    """Run (or resume, when ``out/tune`` holds an interrupted experiment) a Tune experiment."""
    fs, exp_parent = storage.filesystem(out)
    exp_path = storage.join(out, "tune")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with one_pending_trial():
        if tune.Tuner.can_restore(exp_path):
            log.info("resuming the interrupted search in %s", exp_path)
            try:
                tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            except (AttributeError, ImportError) as e:  # its searcher or scheduler class is gone
                raise RaysdError(f"search: {exp_path} holds a search interrupted under another raysd version, whose "
                                 f"state this one cannot restore ({type(e).__name__}: {e}); pass --restart to start "
                                 "it again (its trials are discarded)") from None
            return tuner.fit()
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                        reuse_actors=True, time_budget_s=time_budget_s),
            run_config=tune.RunConfig(name="tune", storage_path=exp_parent, storage_filesystem=fs,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=callbacks or [], verbose=1))
        return tuner.fit()


def outcome(result: dict[str, Any] | None, error: bool) -> str:
    """What a trial did, in trials.csv's words: complete, pruned (cut by the scheduler) or error."""
    if error:
        return "error"
    return "complete" if (result or {}).get("finished") else "pruned"


class TrialLogger(tune.Callback):
    """One line per finished trial: parameters, CAS, epochs, seconds, what it did, what informed it."""

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        r = trial.last_result or {}
        p = {k: trial.config.get(k) for k in PARAMS}
        seen = trial.config.get(STUDY_AT_SUGGESTION) or {}
        print(f"[raysd] trial {trial.trial_id}: IS={p['num_inference_steps']} UGS={p['guidance_scale']:.3f} "
              f"epoch={p['epoch']}: CAS {r.get(METRIC, float('nan')):.4f} after {r.get('epoch', 0)} epochs "
              f"({outcome(r, False)}), {r.get('time_total_s', 0):.1f}s; suggested from {seen.get('complete', '?')} "
              f"complete and {seen.get('pruned', '?')} pruned trial(s)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
        print(f"[raysd] trial {trial.trial_id} failed: {trial.error_file}", flush=True)
