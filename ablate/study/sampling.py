"""Samplers that never replay a draw: each trial samples with a seed of its own, and a finite space
never repeats a configuration.

Optuna's samplers are seeded per process, so every process that builds ``TPESampler(seed=0)``
replays the same start-up draws: two workers, or a search resumed in a new process, train the same
configurations again. Here each trial gets a sampler seeded by (the search's seed, the trial's
number). Trial numbers are unique within a study, so workers on any number of machines draw
differently, a resumed search continues instead of replaying, and a search run start to finish in
one process is still reproducible (the same numbers get the same seeds and see the same history).

Where every parameter takes finitely many values (choices, or ranges with a step), a proposal
that repeats a configuration already tried (finished or running) is replaced by an untried one,
chosen at random with the trial's seed; ``finite_size`` lets a search cap its budget at the size
of its space.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from optuna import Study
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

MAX_ENUMERATED = 100_000
"""A finite space larger than this is treated as infinite (it is not enumerated)."""

_TRIED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def trial_seed(seed: int, number: int) -> int:
    """The seed of one trial's sampler: a hash of the search's seed and the trial number."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, number]).generate_state(1)[0])


def values_of(dist: BaseDistribution) -> list[Any] | None:
    """Every value a distribution can take, or None when there are infinitely many."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        if dist.log:
            return list(range(dist.low, dist.high + 1))
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        count = round((dist.high - dist.low) / dist.step) + 1
        return [dist.low + i * dist.step for i in range(count)]
    return None


def finite_size(space: Mapping[str, BaseDistribution]) -> int | None:
    """How many configurations a space has, or None when infinite (or too large to enumerate)."""
    size = 1
    for dist in space.values():
        values = values_of(dist)
        if values is None:
            return None
        size *= len(values)
        if size > MAX_ENUMERATED:
            return None
    return size


class TrialSeededSampler(BaseSampler):
    """Delegates each trial to a fresh sampler made by ``make(trial_seed(seed, trial.number))``.

    With ``space`` (every parameter's distribution) and a finite space, configurations are not
    repeated while untried ones are left.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int,
                 space: Mapping[str, BaseDistribution] | None = None):
        self._make = make
        self._seed = seed
        self._space = dict(space) if space is not None and finite_size(space) is not None else None
        self._current: tuple[int, BaseSampler] | None = None

    def _inner(self, trial: FrozenTrial) -> BaseSampler:
        if self._current is None or self._current[0] != trial.number:
            self._current = (trial.number, self._make(trial_seed(self._seed, trial.number)))
        return self._current[1]

    def reseed_rng(self) -> None:
        """Nothing to reseed: every trial's sampler is seeded from its number."""

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        """Make this trial's sampler and let it prepare."""
        self._inner(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The whole space when it is finite (so a configuration is chosen at once), else the inner sampler's."""
        if self._space is not None:
            return dict(self._space)
        return self._inner(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """The inner sampler's proposal; in a finite space, an untried configuration instead of a repeat."""
        inner = self._inner(trial)
        if self._space is None:
            return inner.sample_relative(study, trial, search_space)
        proposal = inner.sample_relative(study, trial, inner.infer_relative_search_space(study, trial))
        for name, dist in self._space.items():
            if name not in proposal:
                proposal[name] = inner.sample_independent(study, trial, name, dist)
        tried = {self._key(t.params) for t in study.get_trials(deepcopy=False, states=_TRIED)
                 if t.number != trial.number and set(self._space) <= set(t.params)}
        if self._key(proposal) not in tried:
            return proposal
        untried = [c for c in self._configurations() if self._key(c) not in tried]
        if not untried:
            return proposal
        return random.Random(trial_seed(self._seed, trial.number) + 1).choice(untried)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        """Delegated to this trial's sampler."""
        return self._inner(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        """Delegated to this trial's sampler."""
        self._inner(trial).after_trial(study, trial, state, values)

    def _key(self, params: Mapping[str, Any]) -> tuple[float, ...]:
        assert self._space is not None
        return tuple(_internal(dist, params[name]) for name, dist in self._space.items())

    def _configurations(self) -> list[dict[str, Any]]:
        assert self._space is not None
        names = list(self._space)
        grids = [values_of(self._space[n]) or [] for n in names]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grids)]


def _internal(dist: BaseDistribution, value: Any) -> float:
    """A value's internal representation, rounded so that float steps compare equal."""
    internal = dist.to_internal_repr(value)
    return round(float(internal), 10) if math.isfinite(float(internal)) else float(internal)
