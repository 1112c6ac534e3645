"""InfoNCE (CLIP-style, in-batch negatives): the quick-start's contrastive loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ablate.errors import AblateError
from ablate.losses._functional import check_ids, fp32_unit, info_nce, shared_ligand_mask
from ablate.losses._members import Stacked


class InfoNCELoss(nn.Module):
    """CLIP-style InfoNCE with in-batch negatives.

    Both sides are L2-normalised; ``logits = p @ t.T / temperature``; the diagonal holds the
    positives. ``symmetric=True`` averages the pocket->ligand and ligand->pocket
    cross-entropies, ``symmetric=False`` keeps pocket->ligand only. ``learnable=True`` learns
    log(1/temperature), clamped so that 1/temperature stays within [1, 100]. With
    ``ligand_ids``, pairs that share a ligand are dropped from each other's denominators.
    """

    label = "InfoNCE"
    contrastive = True
    reads: ClassVar[dict[str, str]] = {"learnable_temperature": "learnable"}
    MAX_SCALE = 100.0

    def __init__(self, temperature: float = 0.07, symmetric: bool = True, learnable: bool = False):
        super().__init__()
        if not temperature > 0:
            raise AblateError(f"temperature must be > 0, got {temperature}")
        self.symmetric = symmetric
        self.learnable = learnable
        self.temperature_value = temperature
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)

    @property
    def temperature(self) -> float:
        """The current temperature (after clamping, when learnable)."""
        return float(1.0 / self._scale().detach())

    def _scale(self) -> Tensor:
        if self.learnable:
            return self.log_scale.clamp(0.0, math.log(self.MAX_SCALE)).exp()
        return self.log_scale.exp()

    def scale(self) -> Tensor | float:
        """1 / temperature: a tensor in the autograd graph when learnable, else the exact number."""
        return self._scale() if self.learnable else 1.0 / self.temperature_value

    def logged(self) -> dict[str, float]:
        """The temperature, when it is learned (a metric per epoch)."""
        return {"temperature": self.temperature} if self.learnable else {}

    def logits(self, pred: Tensor, target: Tensor) -> Tensor:
        """[B, B] float32 logits: cosine similarities divided by the temperature."""
        with torch.autocast(pred.device.type, enabled=False):
            p, t = fp32_unit(pred), fp32_unit(target)
            if self.learnable:
                return (p @ t.T) * self._scale().to(p.dtype)
            return (p @ t.T).mul_(1.0 / self.temperature_value)

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """The InfoNCE loss of a batch."""
        check_ids(pred, ligand_ids)
        mask = None if ligand_ids is None else shared_ligand_mask(ligand_ids)
        return info_nce(pred, target, self.scale(), mask, self.symmetric)

    @classmethod
    def stack(cls, criteria: Sequence[InfoNCELoss]) -> Stacked:
        """K members at once: one temperature and direction flag per member, one batched computation."""
        return _StackedInfoNCE(criteria)


class _StackedInfoNCE:
    """InfoNCE of K members on [K, B, D]; ``weight`` scales each member's value (the combined loss's alpha)."""

    def __init__(self, criteria: Sequence[InfoNCELoss]):
        self.criteria = list(criteria)
        self.learnable = any(c.learnable for c in criteria)
        self._fixed: dict[tuple[torch.device, torch.dtype], dict[str, Any]] = {}

    def scales(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Each member's 1 / temperature [K] (a learnable one as it is now, in the autograd graph)."""
        return torch.stack([(c._scale() if c.learnable else torch.tensor(1.0 / c.temperature_value)).to(device, dtype)
                            for c in self.criteria])

    def __call__(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        dtype = torch.promote_types(pred.dtype, torch.float32)
        key = (pred.device, dtype)
        if key not in self._fixed:
            self._fixed[key] = {
                "scales": None if self.learnable else self.scales(pred.device, dtype),
                "symmetric": torch.tensor([c.symmetric for c in self.criteria], device=pred.device),
            }
        fixed = self._fixed[key]
        scales = self.scales(pred.device, dtype) if self.learnable else fixed["scales"]
        mask = None if ligand_ids is None else shared_ligand_mask(ligand_ids)
        return info_nce(pred, target, scales, mask, fixed["symmetric"]), {}
