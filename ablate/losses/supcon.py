"""Supervised contrastive loss (Khosla et al. 2020): every pair of the same ligand is a positive."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ablate.errors import AblateError
from ablate.losses._functional import fp32_unit, upcast


class SupervisedContrastiveLoss(nn.Module):
    """Khosla et al. (2020) L_out, pocket anchors against the batch's ligands.

    Positives of anchor i: with ``ligand_ids``, every pair with i's ligand (weight 1); with a
    ``similarity`` matrix ``[B, B]`` in [0, 1], every candidate j with weight ``similarity[i, j]``
    (the diagonal counts as 1); with neither, only the diagonal (one-directional InfoNCE).
    ``threshold`` ignores candidates more similar to i's ligand than it (the quick-start's
    "filter ligands with similarity > 0.9"): they are neither negatives nor positives. Without a
    similarity matrix, the similarity is the cosine of the target embeddings, clipped to [0, 1].

        L_i = - sum_{j in A(i)} w_ij log softmax_{A(i)}(p_i . t_j / T) / sum_{j in A(i)} w_ij
    """

    label = "SupCon"
    contrastive = True
    functional = True
    reads: ClassVar[dict[str, str]] = {"supcon_threshold": "threshold"}

    def __init__(self, temperature: float = 0.1, threshold: float | None = None):
        super().__init__()
        if not temperature > 0:
            raise AblateError(f"temperature must be > 0, got {temperature}")
        if threshold is not None and not 0 < threshold <= 1:
            raise AblateError(f"threshold must be in (0, 1], got {threshold}")
        self.temperature = temperature
        self.threshold = threshold

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        ligand_ids: Tensor | None = None,
        similarity: Tensor | None = None,
    ) -> Tensor:
        """The mean over anchors of L_out."""
        with torch.autocast(pred.device.type, enabled=False):
            t = fp32_unit(target)
            logits = (fp32_unit(pred) @ t.T) / self.temperature
            n = logits.shape[0]
            eye = torch.eye(n, dtype=torch.bool, device=logits.device)
            if similarity is not None:
                if similarity.shape != (n, n):
                    raise ValueError(f"similarity must be [{n}, {n}], got {list(similarity.shape)}")
                weights = upcast(similarity).to(logits.dtype).clamp(0, 1).masked_fill(eye, 1.0)
                hard = eye
            elif ligand_ids is not None:
                hard = ligand_ids[:, None] == ligand_ids[None, :]
                weights = hard.to(logits.dtype)
            else:
                hard = eye
                weights = eye.to(logits.dtype)
            keep = torch.ones_like(eye)
            if self.threshold is not None:
                sim = similarity.to(logits.dtype) if similarity is not None else (t @ t.T).clamp(0, 1)
                keep = ~((sim > self.threshold) & ~hard)
            weights = weights * keep
            log_prob = logits.masked_fill(~keep, float("-inf")).log_softmax(dim=1)
            log_prob = log_prob.masked_fill(~keep, 0.0)
            per_anchor = -(weights * log_prob).sum(1) / weights.sum(1)
            return per_anchor.mean()
