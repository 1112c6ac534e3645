"""Mean squared error: the users' baseline."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ablate.losses._functional import mse
from ablate.losses._members import Stacked


class MSELoss(nn.Module):
    """Mean squared error over all elements (the users' baseline)."""

    label = "MSE"
    contrastive = False

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """Mean of (pred - target)^2."""
        return mse(pred, target)

    @classmethod
    def stack(cls, criteria: Sequence[MSELoss]) -> Stacked:
        """K members at once: the formula runs over the leading member axis."""
        return lambda pred, target, ligand_ids: (mse(pred, target), {})
