"""The sigmoid loss of SigLIP (Zhai et al. 2023): every pair of the batch is its own binary decision.

    L = -(1/B) sum_i sum_j log sigmoid(z_ij * (t * <p_i, l_j> + b))

on unit-normalised embeddings, with ``z_ij = +1`` for a pocket and its ligand (and for pairs that
share a ligand id, when the run masks shared ligands) and ``-1`` otherwise. ``t = exp(t')`` and
``b`` are learned, starting at ``t = siglip_scale = 10`` and ``b = siglip_bias = -10`` (the paper's
initialisation: the many negatives start with a small loss). Unlike InfoNCE no softmax couples the
batch, so small batches cost it less (the quick-start's FAQ Q3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.errors import AblateError
from ablate.losses._functional import check_ids, fp32_unit
from ablate.losses._members import Stacked


def sigmoid_loss(pred: Tensor, target: Tensor, log_scale: Tensor, bias: Tensor,
                 ligand_ids: Tensor | None = None) -> Tensor:
    """The SigLIP loss of each batch: [..., B, D] -> [...], with one ``log_scale`` and ``bias`` per leading index."""
    with torch.autocast(pred.device.type, enabled=False):
        similarity = fp32_unit(pred) @ fp32_unit(target).transpose(-1, -2)
        logits = similarity * log_scale.to(similarity.dtype).exp()[..., None, None] \
            + bias.to(similarity.dtype)[..., None, None]
        b = logits.shape[-1]
        eye = torch.eye(b, dtype=torch.bool, device=logits.device)
        positive = eye if ligand_ids is None else eye | (ligand_ids[..., :, None] == ligand_ids[..., None, :])
        signs = torch.where(positive, 1.0, -1.0).to(logits.dtype)
        return -F.logsigmoid(signs * logits).sum(dim=(-2, -1)) / b


class SigLIPLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with a learned scale ``t = exp(t')`` and bias ``b``."""

    label = "SigLIP"
    contrastive = True

    def __init__(self, siglip_scale: float = 10.0, siglip_bias: float = -10.0):
        super().__init__()
        if not (siglip_scale > 0 and math.isfinite(siglip_scale)):
            raise AblateError(f"siglip_scale must be a positive number, got {siglip_scale}")
        if not math.isfinite(siglip_bias):
            raise AblateError(f"siglip_bias must be a finite number, got {siglip_bias}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(siglip_scale)))
        self.bias = nn.Parameter(torch.tensor(float(siglip_bias)))

    @property
    def scale(self) -> float:
        """The current scale t."""
        return float(self.log_scale.detach().exp())

    def logged(self) -> dict[str, float]:
        """The learned scale and bias (metrics per epoch)."""
        return {"siglip_scale": self.scale, "siglip_bias": float(self.bias.detach())}

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """The SigLIP loss of a batch."""
        check_ids(pred, ligand_ids)
        return sigmoid_loss(pred, target, self.log_scale, self.bias, ligand_ids)

    @classmethod
    def stack(cls, criteria: Sequence[SigLIPLoss]) -> Stacked:
        """K members at once: each member's scale and bias (still its own parameters) on the member axis."""
        def stacked(pred: Tensor, target: Tensor, ligand_ids: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
            log_scale = torch.stack([c.log_scale for c in criteria])
            bias = torch.stack([c.bias for c in criteria])
            return sigmoid_loss(pred, target, log_scale, bias, ligand_ids), {}
        return stacked
