"""A study session: one per command. It opens the Optuna storage and the MLflow store once, holds the
study, its validated spec and its MLflow parent run, and offers run, report, summary, confirm and finish.

``cli`` parses a command, opens a session and renders what the session returns; workers in other
processes open their own stores from the study's name (``worker.Context.open``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from ablate.errors import AblateError
from ablate.report import stats
from ablate.report.compare import SearchSummary, SuiteReport, build_report, collect, compute, search_summary
from ablate.report.publish import cached_report, publish, search_report, write_report
from ablate.stores import (
    Stores,
    read_only,
    require_storage,
    require_writable,
    resolve_tracking_uri,
    storage_exists,
)
from ablate.study import records, studies
from ablate.study.designs import SearchSpec, StudySpec, SuiteSpec
from ablate.study.ends import end_abandoned_runs, end_stale_run
from ablate.study.studyfiles import safe_folder, spec_document
from ablate.study.worker import Context, OnEvent, end_parent_if_done
from ablate.tracking.client import Tracker, environment_tags
from ablate.tracking.store import check_store, check_uri
from ablate.vocabulary import Outcome, Tag


class StudySession:
    """One command's view of one study: its stores (each opened once), study, spec and parent run."""

    def __init__(self, stores: Stores, storage: RDBStorage | None = None, tracker: Tracker | None = None):
        self.stores = stores
        self._storage = storage
        self._tracker = tracker
        self._ref: studies.StudyRef | None = None
        self._parent: str | None = None
        self.trained = False
        self.read_only = False
        """Stores this process may only read (``open(..., read_only=True)``): a report is written, not published."""

    # ------------------------------------------------------------------ the stores, opened once

    @property
    def storage(self) -> RDBStorage:
        """The Optuna storage (opened on first use)."""
        if self._storage is None:
            self._storage = studies.open_storage(
                self.stores.storage, heartbeat_seconds=self.stores.heartbeat_seconds,
                on_stale=lambda trial: end_stale_run(self.tracker, trial),
                read_only=self.read_only and read_only(self.stores.storage_url))
        return self._storage

    @property
    def tracker(self) -> Tracker:
        """The MLflow store (opened on first use; ``studies show`` never needs it)."""
        if self._tracker is None:
            uri = self.stores.tracking_uri
            self._tracker = Tracker(uri, writable=not (self.read_only and read_only(resolve_tracking_uri(uri))))
        return self._tracker

    # ------------------------------------------------------------------ opening a study

    @classmethod
    def start(cls, spec: StudySpec, stores: Stores, *, budget: int | None = None,
              devices: Sequence[str] = (), reuse: StudySession | None = None) -> StudySession:
        """Create or resume the study; every input is checked first unless the study has nothing left to train. With
        ``reuse`` (a session of an earlier study, same stores), its open stores serve this one too."""
        for device in devices:
            from ablate.training.devices import resolve_device  # torch loads where a command trains

            resolve_device(device)
        check_uri(resolve_tracking_uri(stores.tracking_uri))  # its shape, at once; reaching it comes later
        require_writable(stores.storage_url)
        session = cls(stores) if reuse is None else cls(stores, reuse._storage, reuse._tracker)
        # A new store is created only after every check: a mistake leaves no file behind. An existing
        # study with nothing left to train needs neither the checks nor MLflow (a re-run is quick).
        if not storage_exists(stores.storage_url) or studies.owes_work(spec, session.storage, budget):
            check_store(resolve_tracking_uri(stores.tracking_uri))  # seconds at most: before torch and the data
            preflight(spec)
            session.tracker  # noqa: B018 - the MLflow store is checked (reached, writable) before the study exists
        session.attach(spec, budget)
        return session

    def attach(self, spec: StudySpec, budget: int | None = None) -> None:
        """Create or resume ``spec``'s study in this session's stores (its queue topped up to the budget)."""
        study = studies.create_or_load(spec, self.storage, budget)
        self._ref = studies.StudyRef(study, spec)
        self._parent = None

    @classmethod
    def open(cls, name: str, stores: Stores, *, reading: bool = False) -> StudySession:
        """An existing study, by its full name or (its newest study) by its spec's name; a missing SQLite storage is
        one line (nothing is created). ``reading``: a command that only reads, so stores it may not write are read
        (``read_only``)."""
        require_storage(stores.storage_url)
        session = cls(stores)
        session.read_only = reading and (read_only(stores.storage_url) or read_only(
            resolve_tracking_uri(stores.tracking_uri)))
        session._ref = studies.load(name, session.storage)
        return session

    @property
    def ref(self) -> studies.StudyRef:
        """The study and its spec."""
        if self._ref is None:
            raise RuntimeError("no study attached to this session")
        return self._ref

    @property
    def study(self) -> optuna.Study:
        """The Optuna study."""
        return self.ref.study

    @property
    def spec(self) -> StudySpec:
        """The study's validated spec."""
        return self.ref.spec

    @property
    def name(self) -> str:
        """The Optuna study name."""
        return self.ref.name

    @functools.cached_property
    def experiment_id(self) -> str:
        """The study's MLflow experiment (named after its spec), created on first use; a suite's gets the
        view that groups its runs by experiment."""
        exp = self.tracker.experiment_id(self.spec.name)
        if not self.spec.searches:
            self.tracker.share_grouped_view(exp)
        return exp

    @property
    def parent_run_id(self) -> str:
        """The study's MLflow parent run, created on first use (also when the study's MLflow store moved)."""
        if self._parent is None:
            self._parent = self._ensure_parent()
        return self._parent

    def _ensure_parent(self) -> str:
        study, spec, tracker = self.study, self.spec, self.tracker
        parent = study.user_attrs.get(records.PARENT_RUN)
        if parent:
            try:
                tracker.client.get_run(parent)
                return str(parent)
            except Exception:  # kept by a study whose MLflow store was another one
                pass
        parent = tracker.start_run(self.experiment_id, study.study_name,
                                   {Tag.STUDY: study.study_name, Tag.KIND: spec.kind,
                                    **environment_tags()}, start_ms=studies.span_ms(study)[0])
        tracker.log_dict(parent, spec_document(spec), "study_spec.json")
        self._log_splits(parent)
        study.set_user_attr(records.PARENT_RUN, parent)
        return str(parent)

    def _log_splits(self, parent: str) -> None:
        """The row indices of every split the study's runs train, validate and test on (``split.json``; one file per
        data spec, named by its fingerprint, when runs differ in their data)."""
        from ablate.tracking.client import SPLIT_FILE
        from ablate.training.splits import load_split  # torch loads where a command trains

        splits = [load_split(data) for data in dict.fromkeys(run.data for _, run in self.spec.preflight_runs())]
        for split in splits:
            name = SPLIT_FILE if len(splits) == 1 else f"split-{split.fingerprint()}.json"
            self.tracker.log_dict(parent, split.document(), name)

    def context(self) -> Context:
        """What a worker in this process needs."""
        return Context(self.study, self.spec, self.tracker, self.experiment_id, self.parent_run_id,
                       self.stores.heartbeat_seconds, self.storage)

    # ------------------------------------------------------------------ what a session does

    @property
    def known_parent_run_id(self) -> str | None:
        """The parent run id the study keeps, without asking MLflow (None before the first training)."""
        parent = self.study.user_attrs.get(records.PARENT_RUN)
        return str(parent) if parent else None

    def pending(self) -> int:
        """Trials waiting or running."""
        c = studies.counts(self.study)
        return c.get("WAITING", 0) + c.get("RUNNING", 0)

    def progress(self) -> tuple[int, int]:
        """(trials finished, trials the study owes in all: its queue, finished or not)."""
        c = studies.counts(self.study)
        owed = sum(1 for t in studies.counted(self.study) if t.user_attrs.get(records.QUEUED))
        return c.get(Outcome.COMPLETE, 0) + c.get(Outcome.PRUNED, 0), owed

    def check_trainable(self) -> None:
        """Refuse to train a study whose new trials would not be comparable with its finished ones."""
        if studies.predates_test_split(self.study):
            raise AblateError(
                f"study {self.name} was made by an ablate without test splits: its new trials would train on fewer "
                "pairs than its finished ones; run its run-suite or tune command again, which starts a new study")

    def run(self, *, jobs: int = 1, devices: Sequence[str] = (), on_event: OnEvent | None = None,
            spawn_after: float = 0.0, array: int | None = 1, keep_checkpoints: bool = False) -> bool:
        """Train the study's queued trials; returns False when interrupted (the parent run ends KILLED).

        With nothing waiting or running, it returns at once and starts no worker.
        """
        if not self.pending():
            return True
        require_writable(self.stores.storage_url)
        self.check_trainable()
        self.trained = True
        self.tracker.set_status(self.parent_run_id, "RUNNING")
        ctx = self.context()  # once per command, before any worker starts
        end_abandoned_runs(ctx.study, ctx.tracker, ctx.experiment_id, ctx.parent_run_id)
        try:
            from ablate.study.launch import execute

            finished = execute(self.context(), self.stores, jobs=jobs, devices=devices, on_event=on_event,
                               spawn_after=spawn_after, array=array, keep_checkpoints=keep_checkpoints)
        except BaseException:
            self.tracker.end_run(self.parent_run_id, "FAILED")
            raise
        if not finished:
            self.tracker.end_run(self.parent_run_id, "KILLED")
        return finished

    def finish(self) -> bool:
        """End the parent run when no trial is waiting or running; returns whether the study is done.

        The run ends when the study's last trial did, not when this command (a report, a re-run) ends it.
        """
        return end_parent_if_done(self.context())

    def seeds_to_add(self, target: float, max_seeds: int) -> tuple[list[int], str]:
        """The seeds a suite adds next for every headline interval to reach ± ``target`` (none when they
        all have, or at ``max_seeds``), and a sentence that says why. The rule looks at the intervals'
        widths only, never at significance."""
        spec = self.spec
        if not isinstance(spec, SuiteSpec):
            raise AblateError(f"{self.name} is a search: only a suite adds seeds")
        comparisons = build_report(self.study, spec).headline()
        n = len(spec.seeds)
        widest = max((c.half_width for c in comparisons if math.isfinite(c.half_width)), default=float("nan"))
        more = stats.next_seed_count(comparisons, n, target, max_seeds) - n
        if more == 0 and stats.precise_enough(comparisons, target):
            return [], f"{n} seeds: every {spec.objective} interval is within ± {target:g} (widest ± {widest:.4g})"
        if more == 0:
            return [], (f"{n} seeds (--max-seeds): the widest {spec.objective} interval is still ± {widest:.4g}, "
                        f"not ± {target:g}")
        start = max(spec.seeds) + 1
        added = list(range(start, start + more))
        which = f"seed {added[0]}" if len(added) == 1 else f"seeds {added[0]}..{added[-1]}"
        return added, (f"{n} seeds: the widest {spec.objective} interval is ± {widest:.4g} > ± {target:g}; "
                       f"adding {which}")

    def report(self, out: Path) -> tuple[SuiteReport, list[Path], bool]:
        """A suite's comparison, written to ``out/STUDY`` and published on the parent run.

        Returns (report, files, rebuilt). A report written earlier from the same finished trials is
        read back from its report.json instead (rebuilt False): MLflow is not touched then.
        """
        spec = self.spec
        if not isinstance(spec, SuiteSpec):
            raise AblateError(f"{self.name} is a search; see it with `ablate studies show {self.name}`")
        folder = safe_folder(out, self.name)
        report = collect(self.study, spec)
        cached = cached_report(report, folder)
        if cached is not None:
            return report, cached, False
        report = compute(report)
        files = write_report(report, self.tracker, folder)
        if not self.read_only:
            publish(report, self.tracker, self.parent_run_id, files)
        return report, files, True

    def summary(self) -> SearchSummary:
        """Trials, best trial, importances and expected best value per budget (any study)."""
        return search_summary(self.study, self.spec)

    def search_plots(self, out: Path, summary: SearchSummary) -> list[Path]:
        """A search's plots, written to ``out/STUDY`` and put on its parent run."""
        spec = self.spec
        if not isinstance(spec, SearchSpec):
            raise AblateError(f"{self.name} is a suite; see it with `ablate report {self.name}`")
        files = search_report(summary, spec, safe_folder(out, self.name), self.name)
        for f in files:
            self.tracker.log_artifact(self.parent_run_id, f, "plots")
        return files

    def confirm(self, k: int) -> StudySession:
        """A new session (same stores) for a suite that re-trains this search's top ``k`` with fresh seeds."""
        spec = self.spec
        if not isinstance(spec, SearchSpec):
            raise AblateError(f"{self.name} is a suite; only a search's configurations can be confirmed")
        finished = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.value is not None]
        if not finished:
            raise AblateError(f"study {self.name!r} has no complete trial to confirm")
        finished.sort(key=lambda t: float(t.value or 0.0), reverse=spec.goal == "maximize")
        ranked = [(t.number, dict(t.user_attrs.get(records.VALUES, {}))) for t in finished[:k]]
        suite = spec.confirmation(ranked, self.name)
        preflight(suite)
        session = StudySession(self.stores, self.storage, self.tracker)
        session.attach(suite)
        return session


def preflight(spec: StudySpec) -> None:
    """Every run of the study checked (data, batch, device, model) before any trial starts; its data files first,
    before torch is imported."""
    from ablate.training import files

    for label, run in spec.preflight_runs():
        try:
            files.check(run.data)
        except AblateError as e:
            raise AblateError(f"{spec.name}: {label}: {e}") from None
    for label, run in spec.preflight_runs():
        try:
            from ablate.training import preflight

            preflight.check(run)
        except AblateError as e:
            raise AblateError(f"{spec.name}: {label}: {e}") from None
