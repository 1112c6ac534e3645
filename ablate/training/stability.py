"""Rules that read a run's epoch history and name an instability, or return None."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ablate.specs import StabilitySpec

Metrics = dict[str, float]


@dataclass(frozen=True)
class Instability:
    """A rule that fired: its name, a sentence for humans and the numbers behind it."""

    rule: str
    message: str
    values: dict[str, float] = field(default_factory=dict)


def check(history: Sequence[Metrics], spec: StabilitySpec) -> Instability | None:
    """The first rule that fires on the latest epoch of ``history``, or None.

    A non-finite loss or gradient fires at once, always. The other rules wait for
    ``spec.grace_epochs`` epochs and each is off when its threshold is None.
    """
    if not history:
        return None
    m = history[-1]
    epoch = len(history) - 1
    for key in ("train/loss", "val/loss", "grad_norm"):
        v = m.get(key)
        if v is not None and not math.isfinite(v):
            return Instability("nonfinite", f"{key} is {v} at epoch {epoch}", {"epoch": epoch})
    if not spec.enabled or epoch < spec.grace_epochs:
        return None
    loss = m["train/loss"]
    if spec.max_loss is not None and loss > spec.max_loss:
        return Instability(
            "loss_ceiling",
            f"train/loss {loss:.4g} is above the ceiling {spec.max_loss:g} at epoch {epoch}",
            {"epoch": epoch, "train/loss": loss, "max_loss": spec.max_loss},
        )
    stage = _current_stage(history)  # a multi-stage run changes its loss: compare within a stage
    if spec.growth_factor is not None and len(stage) > spec.growth_patience:
        best = min(h["train/loss"] for h in stage)
        recent = [h["train/loss"] for h in stage[-spec.growth_patience :]]
        if best > 0 and all(v > spec.growth_factor * best for v in recent):
            return Instability(
                "loss_growth",
                f"train/loss has stayed above {spec.growth_factor:g} x its best ({best:.4g}) "
                f"for {spec.growth_patience} epochs (now {loss:.4g}) at epoch {epoch}",
                {"epoch": epoch, "train/loss": loss, "best_loss": best,
                 "growth_factor": spec.growth_factor},
            )
    grad = m.get("grad_norm")
    if spec.max_grad_norm is not None and grad is not None and grad > spec.max_grad_norm:
        return Instability(
            "grad_explosion",
            f"grad_norm {grad:.4g} is above {spec.max_grad_norm:g} at epoch {epoch}",
            {"epoch": epoch, "grad_norm": grad, "max_grad_norm": spec.max_grad_norm},
        )
    spread = m.get("val/spread")
    if spec.min_spread is not None and spread is not None and spread < spec.min_spread:
        return Instability(
            "collapse",
            f"validation embeddings collapsed: spread {spread:.4g} is below "
            f"{spec.min_spread:g} at epoch {epoch}",
            {"epoch": epoch, "val/spread": spread, "min_spread": spec.min_spread},
        )
    return None


def _current_stage(history: Sequence[Metrics]) -> Sequence[Metrics]:
    """The trailing epochs that share the latest epoch's ``stage`` (all of them without stages)."""
    stage = history[-1].get("stage")
    start = len(history)
    while start > 0 and history[start - 1].get("stage") == stage:
        start -= 1
    return history[start:]
