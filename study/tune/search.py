"""One Optuna (TPE) search and one ASHA scheduler per backbone, inside ONE Ray Tune run.

Why one Tuner with per-backbone searchers (and not one Tuner per backbone, run one after another):
- concurrency: a single Tuner keeps every GPU busy across backbones (the published setting has just
  one trial per backbone; five sequential Tuners would use one GPU at a time, and each Tuner's tail
  would idle the cluster while its last trials finish);
- fairness: each backbone still has its own TPE model (its own Optuna study, in SQLite) with exactly
  the same trial budget, and its own ASHA rungs, so a ResNet trial is only ever stopped for trailing
  other ResNet trials, never because MobileNet reaches a lower loss sooner.
  `BackboneSearcher.suggest` hands out trials round-robin over the backbones that still have budget,
  so they also progress at the same pace.
- resume stays simple: the state that matters (finished trials, Optuna studies) is on disk and
  written when each trial ends (see study.tune.driver), so a resumed study is just a new Tuner with
  smaller budgets.

Optuna is told each trial's BEST value of the space's metric (the epoch whose model was kept), not
the last epoch's, which is what Ray's OptunaSearch would report by default.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from fer.core import names
from study.space import Dist, Space


def optuna_distributions(space: Space, backbone: str | None = None) -> dict:
    """The keys tuned for `backbone` (default: the space's shared `space`) as Optuna
    distributions."""
    tuned = space.space if backbone is None else space.space_for(backbone)
    return {key: _to_optuna(dist) for key, dist in tuned.items()}


def _to_optuna(dist: Dist) -> optuna.distributions.BaseDistribution:
    if dist.kind == "uniform":
        return optuna.distributions.FloatDistribution(*dist.args)
    if dist.kind == "loguniform":
        return optuna.distributions.FloatDistribution(*dist.args, log=True)
    if dist.kind == "int":
        return optuna.distributions.IntDistribution(*dist.args)
    return optuna.distributions.CategoricalDistribution(list(dist.args))


def optuna_storage(study_dir: Path) -> optuna.storages.RDBStorage:
    """The SQLite file holding every backbone's Optuna study (`optuna-dashboard sqlite:///...` opens
    it)."""
    path = Path(study_dir).resolve() / names.OPTUNA_FILE
    return optuna.storages.RDBStorage(
        f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}}
    )


def optuna_study_name(space: Space, backbone: str) -> str:
    return names.optuna_study_name(space.name, backbone)


def discard_interrupted(
    storage: optuna.storages.RDBStorage, study_name: str, recorded: dict | None = None
) -> list[dict]:
    """Settle the trials a killed driver left RUNNING: one whose outcome is recorded (`recorded`:
    Optuna trial number -> outcome.json; with storage the outcome can reach it before the SQLite
    copy does) is told that outcome's value (FAIL if it errored); the others are marked FAIL.
    Returns the start points the others were evaluating.

    Those start points are queued again, so a kill never loses one. TPE ignores failed trials.
    """
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # the study was never created
        return []
    recorded = recorded or {}
    requeue = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        outcome = recorded.get(trial.number)
        if outcome is not None:
            value = outcome.get("metric_value")
            ok = outcome.get("status") in names.FINISHED_OK and value is not None
            state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
            storage.set_trial_state_values(trial._trial_id, state, [float(value)] if ok else None)
            continue
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if "fixed_params" in trial.system_attrs:
            requeue.append(dict(trial.system_attrs["fixed_params"]))
    return requeue


class BackboneSearcher(Searcher):
    """Hands out trials for several backbones, each from its own OptunaSearch with its own
    budget."""

    def __init__(
        self,
        space: Space,
        budgets: dict[str, int],
        storage,
        requeue: dict[str, list] | None = None,
        fresh: dict[str, bool] | None = None,
    ):
        """`fresh[backbone]`: its Optuna study is new, so the start points are queued (once, ever);
        `requeue[backbone]`: start points that a killed run was evaluating, queued again."""
        super().__init__(metric=space.metric, mode=space.mode)
        self.space = space
        self.budgets = dict(budgets)
        self.suggested = {backbone: 0 for backbone in budgets}
        self.backbone_of: dict[str, str] = {}
        self.best: dict[str, float] = {}
        self.searchers: dict[str, OptunaSearch] = {}
        for i, backbone in enumerate(space.backbones):
            # each backbone's own ranges (per_backbone)
            distributions = optuna_distributions(space, backbone)
            if not distributions:  # nothing to tune (e.g. paper.yaml): every trial is fixed
                continue
            is_fresh = True if fresh is None else fresh.get(backbone, True)
            points = (
                list(space.start_points_for(backbone))
                if is_fresh
                else list((requeue or {}).get(backbone, []))
            )
            sampler = optuna.samplers.TPESampler(
                seed=space.seed + i,
                n_startup_trials=min(10, max(1, space.trials_per_backbone // 3)),
            )
            self.searchers[backbone] = OptunaSearch(
                space=distributions,
                metric=space.metric,
                mode=space.mode,
                points_to_evaluate=points or None,
                sampler=sampler,
                study_name=optuna_study_name(space, backbone),
                storage=storage,
            )

    def save(self, checkpoint_path: str) -> None:
        """Nothing to snapshot: the Optuna studies (SQLite) and the trial ledger already hold the
        state, and `fer-study run --resume` rebuilds a searcher from them (see study.tune.driver).
        """

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError(
            "resume a study with `fer-study run ... --resume`, not Tuner.restore"
        )

    def total(self) -> int:
        return sum(self.budgets.values())

    def _next_backbone(self) -> str | None:
        open_ = [
            b for b in self.space.backbones if self.suggested.get(b, 0) < self.budgets.get(b, 0)
        ]
        if not open_:
            return None
        return min(open_, key=lambda b: (self.suggested[b], self.space.backbones.index(b)))

    def suggest(self, trial_id: str) -> dict | None:
        backbone = self._next_backbone()
        if backbone is None:
            return Searcher.FINISHED
        params = self.searchers[backbone].suggest(trial_id) if backbone in self.searchers else {}
        self.suggested[backbone] += 1
        self.backbone_of[trial_id] = backbone
        return self.space.config_for(backbone, params)  # the full trial config: fixed + tuned keys

    def optuna_trial_number(self, trial_id: str) -> int | None:
        searcher = self.searchers.get(self.backbone_of.get(trial_id, ""))
        trial = searcher._ot_trials.get(trial_id) if searcher else None
        return trial.number if trial is not None else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            old = self.best.get(trial_id)
            if old is None or (value < old if self.mode == "min" else value > old):
                self.best[trial_id] = float(value)
        searcher = self.searchers.get(self.backbone_of.get(trial_id, ""))
        if searcher is not None and isinstance(value, (int, float)) and math.isfinite(value):
            searcher.on_trial_result(trial_id, result)

    def forget(self, trial_id: str) -> None:
        """The trial's worker died and Tune runs it again (same trial, same Optuna params): drop the
        dead attempt's best value, so Optuna is told the new attempt's only. Optuna keeps the first
        attempt's intermediate values of steps reported twice (they only feed pruning, which is not
        used)."""
        self.best.pop(trial_id, None)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        searcher = self.searchers.get(self.backbone_of.get(trial_id, ""))
        if searcher is None:
            return
        best = self.best.get(trial_id)
        # our code raised (study.tune.trainable)
        error = error or bool((result or {}).get(names.TRIAL_ERROR_KEY))
        if error or best is None:
            searcher.on_trial_complete(trial_id, None, error=True)
        else:
            searcher.on_trial_complete(trial_id, {**(result or {}), self.metric: best}, error=False)


class PerBackboneScheduler(FIFOScheduler):
    """Routes every trial to its own backbone's ASHA scheduler.

    Each backbone's rungs count its `Space.rung_clock`: fine-tune epochs (the reported
    `finetune_epoch`, 0 through the head stage) wherever every trial fine-tunes, so no trial is
    judged before unfreeze_layers and lr_finetune have acted; the global `epoch` for one-stage
    training. `max_t` is one above the most a trial can run on that clock, so ASHA's max_t cut
    never fires, and rungs at a trial's last epoch or later are dropped: a trial is never stopped
    at its last report, where code after it would not run (docs/pitfalls.md#last-report).
    """

    def __init__(self, space: Space):
        super().__init__()
        self._metric, self._mode = space.metric, space.mode
        sched = space.scheduler
        self.clocks = {backbone: space.rung_clock(backbone) for backbone in space.backbones}
        self.schedulers = {}
        for backbone in space.backbones:
            last = space.rung_epochs(backbone)
            asha = ASHAScheduler(
                time_attr=self.clocks[backbone],
                metric=space.metric,
                mode=space.mode,
                max_t=last + 1,
                grace_period=sched["grace_period"],
                reduction_factor=sched["reduction_factor"],
            )
            for bracket in asha._brackets:  # no rung at the last epoch (see above)
                bracket._rungs = [rung for rung in bracket._rungs if rung[0] < last]
            self.schedulers[backbone] = asha
        self.stopped: set[str] = set()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return not (metric or mode)  # metric and mode come from the space only

    def decision_epochs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Per backbone, its rung clock and the points on it after whose report ASHA may stop a
        trial (its rungs' milestones): a trial saves its best model before those reports only (and
        at its end), not after every improving epoch (study.tune.trainable translates them into
        the trial's own epochs)."""
        points = {}
        for backbone, scheduler in self.schedulers.items():
            milestones = set()
            for bracket in scheduler._brackets:
                milestones.update(math.ceil(milestone) for milestone, _ in bracket._rungs)
            points[backbone] = (self.clocks[backbone], tuple(sorted(milestones)))
        return points

    def _for(self, trial) -> ASHAScheduler:
        return self.schedulers[trial.config["backbone"]]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        value = result.get(self._metric)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            return TrialScheduler.CONTINUE
        decision = self._for(trial).on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            self.stopped.add(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id in self._for(trial)._trial_info:
            value = result.get(self._metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._for(trial).on_trial_complete(tune_controller, trial, result)
            else:
                self._for(trial).on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._for(trial)._trial_info.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial) -> None:
        """A dead worker (our own errors end trials normally): Tune re-adds the trial if it retries
        it, so its rung values from the dead attempt are dropped and the new attempt is judged on
        its own."""
        self.on_trial_remove(tune_controller, trial)
        for bracket in self._for(trial)._brackets:
            for _, recorded in bracket._rungs:
                recorded.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        return "\n".join(f"{b}: {s.debug_string()}" for b, s in self.schedulers.items())


def make_scheduler(space: Space) -> TrialScheduler | None:
    return PerBackboneScheduler(space) if space.scheduler["type"] == "asha" else None
