"""A roadmap: phases of ordinary studies (suites and searches) in one storage, run in order.

Each phase ends in a decision, a rule on a suite's paired comparison read on validation; the best
configuration of each search (on its validation objective) is carried into the studies after it; the
final suite's winner (on validation) is the final model. Nothing here trains: ``cli.roadmap`` runs each
step through a study session, so a re-run resumes every study where it stopped and trains nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from ablate.errors import AblateError
from ablate.specs import RUN_FIELDS, _Strict, validate
from ablate.study import studyfiles
from ablate.study.designs import SearchSpec, StudySpec, SuiteSpec
from ablate.study.interface import NAME_RULE, valid_study_name
from ablate.vocabulary import MetricKey, better, is_test, on_split

RULES = {
    "significant": "better than the baseline with a Holm-adjusted p below alpha",
    "interval": "the 95 % interval of the difference entirely on the better side of 0",
    "mean": "a better mean than the baseline",
}
"""The decision rules on a paired comparison with the baseline, and what each asks."""


class DecisionSpec(_Strict):
    """A phase's decision: a rule on one experiment's comparison with the baseline, on a validation metric."""

    experiment: str
    metric: MetricKey = "val/top1"
    at: Literal["selected", "final"] = "selected"
    """Each run's validation-selected epoch, or its last one."""
    rule: Literal["significant", "interval", "mean"] = "significant"
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    step: str = ""
    """The suite step whose comparison decides (default: the phase's last suite)."""
    advice: str = ""
    """What to change when the decision fails (printed, and in the report)."""

    @property
    def rule_text(self) -> str:
        """What the rule asks, in words (with alpha where it has one)."""
        return RULES[self.rule] + (f" ({self.alpha:g})" if self.rule == "significant" else "")

    @field_validator("metric", mode="before")
    @classmethod
    def _validation(cls, v: Any) -> Any:
        if isinstance(v, str) and is_test(v):
            raise ValueError(f"a decision cannot read a test metric ({v}): it chooses what runs next; decide on "
                             f"{on_split(v, 'val')} (the report gives {v} too)")
        if isinstance(v, str) and not v.startswith("val/"):
            raise ValueError(f"a decision reads a validation metric (val/...), not {v}: a training number says how "
                             "well a loss is minimised, not how well it retrieves")
        return v


class StepSpec(_Strict):
    """One study of a phase: a suite or a search (a study file), with the settings tuned before it."""

    name: str
    suite: str = ""
    search: str = ""
    experiments: list[str] = Field(default_factory=list)
    """A suite's experiments to run (default: all of the file's)."""
    epochs: Annotated[int, Field(ge=1)] | None = None
    """Epochs of every run, counted at the roadmap's ``epochs`` (default: the roadmap's)."""
    tuned: list[str] | dict[str, list[str]] = Field(default_factory=list)
    """Earlier searches whose best values apply: a list (a search's base) or, per experiment, a table (a suite)."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the study file, as ``--set`` gives them."""

    @model_validator(mode="after")
    def _check(self) -> StepSpec:
        if not valid_study_name(self.name):
            raise ValueError(f"step name {self.name!r}: a step name is {NAME_RULE}")
        if bool(self.suite) == bool(self.search):
            raise ValueError(f"step {self.name!r}: give one of suite = \"FILE\" or search = \"FILE\"")
        if self.search and (self.experiments or isinstance(self.tuned, dict)):
            raise ValueError(f"step {self.name!r}: a search takes tuned = [\"STEP\", ...] (applied to its base) and "
                             "no experiments")
        if self.suite and isinstance(self.tuned, list) and self.tuned:
            raise ValueError(f"step {self.name!r}: a suite takes tuned = {{ EXPERIMENT = [\"STEP\", ...] }}, "
                             "naming which experiments take which tuned settings")
        return self

    @property
    def study_file(self) -> str:
        """The study file the step runs."""
        return self.suite or self.search

    @property
    def tuned_by(self) -> list[str]:
        """Every earlier step this one takes tuned values from."""
        steps = self.tuned if isinstance(self.tuned, list) else [s for v in self.tuned.values() for s in v]
        return list(dict.fromkeys(steps))


class PhaseSpec(_Strict):
    """A phase: its steps in order and the decision that ends it."""

    name: str
    title: str = ""
    steps: list[StepSpec] = Field(min_length=1)
    decision: DecisionSpec | None = None

    @property
    def deciding_step(self) -> StepSpec | None:
        """The suite whose comparison the decision reads."""
        if self.decision is None:
            return None
        suites = [s for s in self.steps if s.suite]
        return next((s for s in suites if s.name == self.decision.step), None) if self.decision.step else \
            (suites[-1] if suites else None)


class RoadmapSpec(_Strict):
    """A roadmap plan (``studies/roadmap.toml``): phases of studies, decisions, the final choice."""

    kind: Literal["roadmap"] = "roadmap"
    name: str
    description: str = ""
    epochs: Annotated[int, Field(ge=1)] = 300
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(default=[0, 1, 2], min_length=2)
    n_trials: Annotated[int, Field(ge=1)] | None = None
    """Every search's trial budget (default: each search file's)."""
    model_name: str = ""
    final: str = ""
    """The suite step whose winner is registered (default: the last suite)."""
    runs: dict[str, Any] = Field(default_factory=dict)
    """Run-field overrides for every study (``--set lr=...``, ``--data``, ``--patience``)."""
    phases: list[PhaseSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> RoadmapSpec:
        if not valid_study_name(self.name):
            raise ValueError(f"name {self.name!r}: a roadmap name is {NAME_RULE}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        seen: dict[str, StepSpec] = {}
        for phase in self.phases:
            for step in phase.steps:
                if step.name in seen:
                    raise ValueError(f"step {step.name!r} appears twice; name each step once")
                for earlier in step.tuned_by:
                    if earlier not in seen or not seen[earlier].search:
                        raise ValueError(f"step {step.name!r}: tuned names {earlier!r}, which is not a search "
                                         "step before it")
                seen[step.name] = step
            if phase.decision is not None and phase.deciding_step is None:
                raise ValueError(f"phase {phase.name!r}: its decision needs a suite step in the phase"
                                 + (f" named {phase.decision.step!r}" if phase.decision.step else ""))
        if self.final_step is None:
            raise ValueError(f"final = {self.final!r}: name a suite step (its winner is the final model)")
        return self

    @property
    def steps(self) -> list[StepSpec]:
        """Every step, in order."""
        return [s for p in self.phases for s in p.steps]

    @property
    def final_step(self) -> StepSpec | None:
        """The suite whose winner is the final model."""
        suites = [s for s in self.steps if s.suite]
        return next((s for s in suites if s.name == self.final), None) if self.final else (suites[-1] if suites
                                                                                             else None)

    @property
    def registered_name(self) -> str:
        """The Model Registry name of the final model."""
        return self.model_name or f"ablate-{self.name}"

    def identity(self) -> str:
        """``name-hash`` of the plan's settings (its texts, the description, titles and advice, left out): a changed
        setting is another roadmap, with its own report and MLflow run."""
        doc = self.model_dump(mode="json", exclude={"description"})
        for phase in doc["phases"]:
            phase.pop("title", None)
            if phase.get("decision"):
                phase["decision"].pop("advice", None)
        blob = json.dumps(doc, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def step_epochs(self, step: StepSpec) -> int:
        """The epochs of a step's runs."""
        return step.epochs or self.epochs


# --------------------------------------------------------------------------------------
# Reading a plan
# --------------------------------------------------------------------------------------


def load_roadmap(name: str, overrides: dict[str, Any] | None = None, *, epochs: int | None = None) -> RoadmapSpec:
    """Read a roadmap plan (by name in studies/ or a path), scale it to ``epochs``, apply ``--set`` overrides
    (paths into the plan, or run fields for every study) and check that every step's study resolves."""
    path = studyfiles.find_study(name)
    doc = studyfiles.read_document(path)
    if doc.get("kind") != "roadmap":
        raise AblateError(f"{path}: not a roadmap (kind = {doc.get('kind')!r}); run it with "
                          f"`ablate {'tune' if doc.get('kind') == 'search' else 'run-suite'} {name}`")
    doc.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        _override(doc, key, value)
    if epochs is not None:
        _scale(doc, epochs)
    spec = validate(RoadmapSpec, doc, str(path))
    check(spec)
    return spec


def _override(doc: dict[str, Any], key: str, value: Any) -> None:
    """One ``--set``: a path into the plan (phases and steps by name), else a run field for every study."""
    head = key.split(".")[0]
    if head in RoadmapSpec.model_fields:
        _set(doc, key.split("."), key, value)
    elif head in RUN_FIELDS:
        runs = doc.setdefault("runs", {})
        if not isinstance(runs, dict):
            raise AblateError(f"--set {key}: the plan's runs is a value ({runs!r}), not a table; write it as [runs]")
        runs[key] = value
    else:
        raise AblateError(f"--set {key}: neither a roadmap setting ({', '.join(RoadmapSpec.model_fields)}) nor a "
                          "run field")


def _set(node: dict[str, Any], parts: list[str], key: str, value: Any) -> None:
    """Set ``parts`` below ``node``; a list of tables (phases, steps) is entered by the name of one of them."""
    head, rest = parts[0], parts[1:]
    if not rest:
        node[head] = value
        return
    nxt = node.get(head)
    if isinstance(nxt, list) and not all(isinstance(x, dict) for x in nxt):
        raise AblateError(f"--set {key}: {head} is a list of values; give all of it, e.g. --set {head}=[...]")
    if isinstance(nxt, list):
        found = next((x for x in nxt if isinstance(x, dict) and x.get("name") == rest[0]), None)
        if found is None:
            names = ", ".join(str(x.get("name")) for x in nxt if isinstance(x, dict))
            raise AblateError(f"--set {key}: no {head.removesuffix('s')} named {rest[0]!r} (the plan has: {names})")
        if not rest[1:]:
            raise AblateError(f"--set {key}: name a setting of it, e.g. --set {key}.title=...")
        _set(found, rest[1:], key, value)
        return
    if nxt is None:
        nxt = node[head] = {}
    if not isinstance(nxt, dict):
        raise AblateError(f"--set {key}: {head!r} is a value, not a table")
    _set(nxt, rest, key, value)


def _scale(doc: dict[str, Any], epochs: int) -> None:
    """Every step's epochs scaled from the plan's ``epochs`` to ``epochs`` (each keeps its share, at least 1)."""
    old = doc.get("epochs", RoadmapSpec.model_fields["epochs"].default)
    if not isinstance(old, int) or isinstance(old, bool) or old < 1:
        return  # validated, and explained, later
    for phase in doc.get("phases") or []:
        for step in (phase.get("steps") or []) if isinstance(phase, dict) else []:
            if isinstance(step, dict) and isinstance(step.get("epochs"), int):
                step["epochs"] = max(1, round(step["epochs"] * epochs / old))
    doc["epochs"] = epochs


def check(spec: RoadmapSpec) -> None:
    """Every step's study file resolves (with the values it would be tuned with left at their defaults), each suite
    has the experiments the plan names, and each decision names an experiment of its suite."""
    for phase in spec.phases:
        for step in phase.steps:
            study = study_of(spec, step, {})
            if isinstance(study, SuiteSpec) and isinstance(step.tuned, dict):
                for exp in step.tuned:
                    if exp not in study.experiments:
                        raise AblateError(f"step {step.name!r}: tuned names {exp!r}, not an experiment of its suite "
                                          f"({', '.join(study.experiments)})")
            if phase.deciding_step is step and phase.decision is not None:
                assert isinstance(study, SuiteSpec)
                exp = phase.decision.experiment
                if exp not in study.experiments or exp == study.baseline_name:
                    raise AblateError(f"phase {phase.name!r}: the decision's experiment {exp!r} must be one of "
                                      f"{', '.join(e for e in study.experiments if e != study.baseline_name)}")


# --------------------------------------------------------------------------------------
# A step's study, with the values tuned before it
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tuned:
    """A search's best trial on its validation objective: what it carries into later studies."""

    step: str
    study: str
    number: int
    objective: str
    value: float
    values: dict[str, Any]
    """The run fields the trial set (``temperature``, ``batch_size`` and the ``lr`` it scales, ...)."""
    epochs: int


def study_of(spec: RoadmapSpec, step: StepSpec, tuned: dict[str, Tuned]) -> StudySpec:
    """The study a step runs: its file, the step's settings, the roadmap's runs and seeds, and the tuned values
    (only what the receiving run reads; epoch counts scaled to its epochs). A step whose inputs are not
    tuned yet gets its file's values."""
    epochs = spec.step_epochs(step)
    overrides: dict[str, Any] = {**step.set, **spec.runs, "name": f"{spec.name}-{step.name}"}
    if step.suite and "seeds" not in step.set:  # the roadmap's seeds, unless the step sets its own
        overrides["seeds"] = list(spec.seeds)
    study = studyfiles.load_study(step.study_file, overrides, epochs=epochs, experiments=step.experiments or None)
    if (isinstance(study, SearchSpec) and step.suite) or (isinstance(study, SuiteSpec) and step.search):
        raise AblateError(f"step {step.name!r}: {step.study_file} is a {study.kind}; name it with "
                          f"{study.kind} = \"{step.study_file}\"")
    carried: dict[str, Any] = {}
    if isinstance(study, SearchSpec):
        carried.update(_carry(study.base.applicable(), step.tuned_by, tuned, epochs, ""))
    else:
        for exp, names in (step.tuned.items() if isinstance(step.tuned, dict) else []):
            if exp in study.experiments:
                carried.update(_carry(study.experiments[exp].applicable(), names, tuned, epochs,
                                      f"experiments.{exp}."))
    if not carried:
        return study
    return studyfiles.load_study(step.study_file, {**overrides, **carried}, epochs=epochs,
                                 experiments=step.experiments or None)


def _carry(applicable: dict[str, Any], names: Sequence[str], tuned: dict[str, Tuned], epochs: int,
           prefix: str) -> dict[str, Any]:
    """The overrides that set the tuned values of ``names`` a run reads (``applicable``); stage lengths are counted
    in the search's epochs and scaled to the run's."""
    from ablate import losses

    staged = {f for name in losses.builtin_names() for f in losses.resolve(name).epoch_fields}
    out: dict[str, Any] = {}
    for name in names:
        t = tuned.get(name)
        for key, value in (t.values.items() if t is not None else []):
            if key not in applicable:
                continue
            if key in staged and t is not None and t.epochs != epochs and isinstance(value, int):
                value = max(1 if value else 0, math.floor(value * epochs / t.epochs))
            out[prefix + key] = value
    return out


# --------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """A phase's decision as taken: passed or not, and the numbers that say why."""

    phase: str
    passed: bool
    reason: str
    forced: bool = False
    advice: str = ""

    @property
    def word(self) -> str:
        """'passed', 'failed' or 'failed (--force: going on)'."""
        return "passed" if self.passed else ("failed (--force: going on)" if self.forced else "failed")


def decide(phase: PhaseSpec, report: Any, force: bool = False) -> Decision:
    """Apply a phase's decision rule to its suite's comparison (``report.compare.SuiteReport``)."""
    from ablate.report.compare import ensure_row

    d = phase.decision
    assert d is not None
    row = ensure_row(report, d.experiment, d.metric, d.at)
    c = row.comparison
    where = "selected epoch" if d.at == "selected" else "last epoch"
    if c is None or not math.isfinite(c.diff):
        reason = f"{d.experiment} against {report.baseline} on {d.metric} ({where}): no comparison (too few seeds)"
        return Decision(phase.name, False, reason, force, d.advice)
    sign = 1.0 if better(d.metric) == "maximize" else -1.0
    passed = {
        "significant": sign * c.diff > 0 and math.isfinite(row.p_holm) and row.p_holm < d.alpha,
        "interval": math.isfinite(c.half_width) and (c.ci_low > 0 if sign > 0 else c.ci_high < 0),
        "mean": sign * c.diff > 0,
    }[d.rule]
    holm = f"{row.p_holm:.3g}" if math.isfinite(row.p_holm) else "n/a"
    reason = (f"{d.experiment} against {report.baseline} on {d.metric} ({where}, {c.n} seeds): difference "
              f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}], Holm p = {holm}; rule: {d.rule_text}")
    return Decision(phase.name, passed, reason, force and not passed, d.advice)


def best_trial(study: Any, spec: SearchSpec, step: str) -> Tuned:
    """A finished search's best complete trial on its objective (validation), as values to carry forward."""
    from optuna.trial import TrialState

    from ablate.study import records

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and not t.user_attrs.get(records.SKIPPED)]
    if not complete:
        raise AblateError(f"step {step!r}: study {study.study_name} has no complete trial (every one failed or was "
                          f"pruned); see `ablate studies show {study.study_name}`")
    sign = 1.0 if spec.goal == "maximize" else -1.0
    pick = max(complete, key=lambda t: (sign * float(t.value), -t.number))  # a tie: the first, as `studies show`
    values = dict(pick.user_attrs.get(records.VALUES) or pick.params)
    return Tuned(step, study.study_name, pick.number, spec.objective, float(pick.value), values, spec.base.epochs)

