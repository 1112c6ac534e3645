"""Stability rules on hand-made histories, and a real unstable run pruned by the right rule."""

from __future__ import annotations

import pytest
from support import tiny_run

from ablate.specs import StabilitySpec
from ablate.training.splits import load_split
from ablate.training.stability import check
from ablate.training.trainer import Trainer

RULES = StabilitySpec(max_loss=10.0, growth_factor=2.0, growth_patience=3, max_grad_norm=100.0,
                      min_spread=0.05, grace_epochs=2)


def _epoch(loss=1.0, grad=1.0, spread=0.9, val_loss=1.0):
    return {"train/loss": loss, "val/loss": val_loss, "grad_norm": grad, "val/spread": spread}


def test_a_stable_history_fires_nothing():
    history = [_epoch(loss=3.0 - 0.1 * i) for i in range(10)]
    assert check(history, RULES) is None


def test_non_finite_fires_at_once_even_in_the_grace_period_and_when_disabled():
    found = check([_epoch(loss=float("nan"))], RULES)
    assert found is not None and found.rule == "nonfinite" and "train/loss" in found.message
    assert check([_epoch(grad=float("inf"))], StabilitySpec(enabled=False)).rule == "nonfinite"


def test_loss_ceiling_waits_for_the_grace_period():
    assert check([_epoch(loss=50.0)] * 2, RULES) is None
    found = check([_epoch(loss=50.0)] * 3, RULES)
    assert found.rule == "loss_ceiling"
    assert found.values == {"epoch": 2, "train/loss": 50.0, "max_loss": 10.0}


def test_loss_growth_needs_patience_epochs_above_the_factor():
    history = [_epoch(loss=v) for v in (2.0, 1.0, 2.5, 2.5)]
    assert check(history, RULES) is None  # only two epochs above 2 x best
    history.append(_epoch(loss=2.1))
    found = check(history, RULES)
    assert found.rule == "loss_growth" and found.values["best_loss"] == 1.0


def test_loss_growth_compares_within_a_multistage_stage():
    # MSE warm-up losses are small; the InfoNCE stage starts higher: not a divergence.
    history = [dict(_epoch(loss=v), stage=1.0) for v in (0.5, 0.2, 0.1)]
    history += [dict(_epoch(loss=v), stage=2.0) for v in (0.9, 0.8, 0.7, 0.6)]
    assert check(history, RULES) is None
    history += [dict(_epoch(loss=v), stage=2.0) for v in (1.3, 1.4, 1.5)]
    found = check(history, RULES)
    assert found.rule == "loss_growth" and found.values["best_loss"] == 0.6


def test_exploding_gradient_and_collapse():
    assert check([_epoch()] * 2 + [_epoch(grad=1e4)], RULES).rule == "grad_explosion"
    found = check([_epoch()] * 2 + [_epoch(spread=0.01)], RULES)
    assert found.rule == "collapse" and found.values["val/spread"] == 0.01


def test_a_rule_set_to_none_is_off():
    rules = RULES.model_copy(update={"max_loss": None})
    assert check([_epoch(loss=50.0)] * 3, rules) is None


def _first_rule(spec, rules):
    split = load_split(spec.data)
    train, val = split.train, split.val
    history = []
    for result in Trainer(spec, train, val).epochs():
        history.append(result.metrics)
        found = check(history, rules)
        if found is not None:
            return found, result.epoch
    return None, len(history) - 1


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_temperature_with_large_lr_is_stopped_by_the_loss_ceiling(seed):
    # The quick-start's symptom of a too-small temperature: "InfoNCE loss > 10".
    unstable = tiny_run(loss="infonce", temperature=0.002, lr=1.0, epochs=10, seed=seed,
                        model={"hidden": [32], "dropout": 0.1})
    found, epoch = _first_rule(unstable, RULES)
    assert found is not None and found.rule == "loss_ceiling"
    assert epoch <= 3

    stable = tiny_run(loss="infonce", temperature=0.07, lr=5e-4, epochs=10, seed=seed,
                      model={"hidden": [32], "dropout": 0.1})
    assert _first_rule(stable, RULES)[0] is None
