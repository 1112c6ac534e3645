"""The members' optimizer: one fused AdamW over every member's parameters, each member clipped by its own norm.

Parameter groups are formed per distinct (learning rate, weight decay) among the members, so the
fused kernel runs once per group rather than once per member; every parameter's update is the one
it gets alone. A member's loss parameters (a learnable temperature) train without weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ablate.training.devices import AdamW, Amp


class MemberOptimizer:
    """AdamW over the members of an array (``trainer.Member``: index, spec, model, criterion, params)."""

    def __init__(self, members: Sequence[Any], lr: float, device: torch.device):
        self.sets: list[tuple[int, list[nn.Parameter], float]] = []
        """What the optimizer's groups are made of: (member index, parameters, weight decay)."""
        for m in members:
            self.sets.append((m.index, list(m.model.parameters()), m.spec.weight_decay))
            extra = [p for p in m.criterion.parameters() if p.requires_grad]
            if extra:
                self.sets.append((m.index, extra, 0.0))
        self._grouping: tuple[tuple[int, ...], ...] = ()
        self._owners: tuple[tuple[int, ...], Tensor] = ((), torch.zeros(0))
        self.adamw = AdamW([{"params": [p for _, ps, _ in self.sets for p in ps]}], lr, device)

    @property
    def state(self) -> dict[Any, Any]:
        """AdamW's state per parameter (what a checkpoint keeps)."""
        return self.adamw.state

    def set_lrs(self, lr_of: dict[int, float]) -> None:
        """Each member's learning rate (by member index); groups change only when the distinct rates do."""
        keyed: dict[tuple[float, float], list[int]] = {}
        for i, (index, _, wd) in enumerate(self.sets):
            keyed.setdefault((lr_of[index], wd), []).append(i)
        grouping = tuple(tuple(v) for v in keyed.values())
        if grouping == self._grouping:
            for group, (lr, _) in zip(self.adamw.param_groups, keyed, strict=True):
                group["lr"] = lr
            return
        defaults = self.adamw.defaults
        self.adamw.param_groups = [
            {**defaults, "params": [p for i in sets for p in self.sets[i][1]], "lr": lr, "weight_decay": wd}
            for (lr, wd), sets in keyed.items()]
        self._grouping = grouping

    def drop(self, gone: set[int], staying: Sequence[int]) -> None:
        """Forget the members ``gone`` (their state too); ``staying`` are the member indices left."""
        for p in (p for index, ps, _ in self.sets if index in gone for p in ps):
            self.adamw.state.pop(p, None)
        self.sets = [entry for entry in self.sets if entry[0] not in gone]
        self.set_lrs(dict.fromkeys(staying, 0.0))  # the next epoch sets the rates

    def step(self, members: Sequence[Any], amp: Amp) -> Tensor:
        """Clip each member's gradient by its own norm (never one norm across members), step, zero the gradients,
        and return each member's total gradient norm [K] (before clipping)."""
        scaler = amp.scaler
        if scaler is not None:
            scaler.unscale_(self.adamw)  # type: ignore[arg-type]  # duck-typed: param_groups, step
        by_member = [[p.grad for p in m.params if p.grad is not None] for m in members]
        grads = [g for mine in by_member for g in mine]
        per_tensor = torch.stack(torch._foreach_norm(grads))
        counts = tuple(len(mine) for mine in by_member)
        if counts != self._owners[0]:  # which member each gradient belongs to, kept while it holds
            self._owners = counts, torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(
                per_tensor.device)
        total = torch.zeros(len(by_member), dtype=per_tensor.dtype, device=per_tensor.device)
        total = total.index_add_(0, self._owners[1], per_tensor.pow(2)).sqrt()
        for k, m in enumerate(members):
            if m.spec.grad_clip is not None and by_member[k]:
                coef = torch.clamp(m.spec.grad_clip / (total[k] + 1e-6), max=1.0)
                torch._foreach_mul_(by_member[k], coef)
        if scaler is not None:
            scaler.step(self.adamw)  # type: ignore[arg-type]
            scaler.update()
        else:
            self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        return total


def mean_norm(per_step: Tensor, skip_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    """Each member's mean over steps of its total gradient norm ([steps, K] -> [K]), and the number
    of steps left out as non-finite (with ``skip_nonfinite``: the steps a float16 grad scaler
    skipped after an overflow, which are not a divergence)."""
    if not skip_nonfinite:
        return per_step.mean(0), torch.zeros(per_step.shape[1])
    finite = torch.isfinite(per_step)
    kept = torch.where(finite, per_step, torch.zeros_like(per_step)).sum(0)
    count = finite.sum(0)
    mean = torch.where(count > 0, kept / count.clamp(min=1), torch.full_like(kept, float("nan")))
    return mean, (~finite).sum(0).float()
