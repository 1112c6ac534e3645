"""The quick-start's weighted combination: alpha * InfoNCE + beta * cosine + gamma * MSE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from ablate.errors import AblateError
from ablate.losses._functional import cosine, mse
from ablate.losses._members import Stacked
from ablate.losses.cosine import CosineSimilarityLoss
from ablate.losses.infonce import InfoNCELoss, _StackedInfoNCE
from ablate.losses.mse import MSELoss


class CombinedLoss(nn.Module):
    """alpha * InfoNCE + beta * cosine + gamma * MSE; ``last_components`` keeps the parts."""

    label = "combined"
    contrastive = True
    reads: ClassVar[dict[str, str]] = {"learnable_temperature": "learnable"}
    components = ("infonce", "cosine", "mse")

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.3,
        gamma: float = 0.2,
        temperature: float = 0.07,
        symmetric: bool = True,
        learnable: bool = False,
    ):
        super().__init__()
        weights = {"alpha": alpha, "beta": beta, "gamma": gamma}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise AblateError(
                f"combined loss weights must be >= 0 and not all zero, got {weights}"
            )
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.infonce = InfoNCELoss(temperature, symmetric=symmetric, learnable=learnable)
        self.cosine = CosineSimilarityLoss()
        self.mse = MSELoss()
        self.last_components: dict[str, Tensor] = {}

    def logged(self) -> dict[str, float]:
        """The InfoNCE part's temperature, when it is learned."""
        return self.infonce.logged()

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """The weighted sum; the unweighted parts are kept in ``last_components``."""
        parts = {
            "infonce": self.infonce(pred, target, ligand_ids),
            "cosine": self.cosine(pred, target),
            "mse": self.mse(pred, target),
        }
        self.last_components = {k: v.detach() for k, v in parts.items()}
        return self.alpha * parts["infonce"] + self.beta * parts["cosine"] + self.gamma * parts["mse"]

    @classmethod
    def stack(cls, criteria: Sequence[CombinedLoss]) -> Stacked:
        """K members at once: each part computed once over the member axis, weighted per member.

        A part whose weight is 0 for every member is not computed; a member whose weight is 0 adds
        exactly 0 (not 0 * a part), as the member alone does."""
        infonce = _StackedInfoNCE([c.infonce for c in criteria])
        raw = [(c.alpha, c.beta, c.gamma) for c in criteria]
        formulas: dict[str, Stacked] = {"infonce": infonce, "cosine": lambda p, t, i: (cosine(p, t), {}),
                    "mse": lambda p, t, i: (mse(p, t), {})}

        def stacked(pred: Tensor, target: Tensor, ligand_ids: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
            dtype = torch.promote_types(pred.dtype, torch.float32)
            weights = torch.tensor(raw, dtype=dtype, device=pred.device)
            zero = torch.zeros(len(raw), dtype=dtype, device=pred.device)
            loss, parts = zero, {}
            for j, (name, formula) in enumerate(formulas.items()):
                if any(w[j] > 0 for w in raw):
                    parts[name] = formula(pred, target, ligand_ids)[0]
                    w = weights[:, j]
                    loss = loss + torch.where(w > 0, w * parts[name], zero)
            return loss, {name: v.detach() for name, v in parts.items()}

        return stacked
