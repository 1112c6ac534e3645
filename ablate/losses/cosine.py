"""Cosine loss: aligns directions and ignores norms."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ablate.losses._functional import cosine
from ablate.losses._members import Stacked


class CosineSimilarityLoss(nn.Module):
    """Mean of 1 - cos(pred, target): aligns directions and ignores norms."""

    label = "cosine"
    contrastive = False

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """Mean over the batch of 1 - cosine similarity."""
        return cosine(pred, target)

    @classmethod
    def stack(cls, criteria: Sequence[CosineSimilarityLoss]) -> Stacked:
        """K members at once: the formula runs over the leading member axis."""
        return lambda pred, target, ligand_ids: (cosine(pred, target), {})
