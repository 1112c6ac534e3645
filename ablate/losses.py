"""The quick-start's losses for pocket -> ligand embedding alignment, and the multi-stage schedule.

Every loss is called as ``criterion(pocket_embedding, target_embedding, ligand_ids=None)`` on
``[B, D]`` tensors and returns a scalar. Contrastive losses compute their logits and softmax in
float32, also under autocast. ``contrastive = True`` marks the losses whose value for a sample
depends on the rest of the batch (the trainer accumulates those with GradCache).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.errors import AblateError

__all__ = [
    "CombinedLoss",
    "CosineSimilarityLoss",
    "InfoNCELoss",
    "MSELoss",
    "MultiStageScheduler",
    "SupervisedContrastiveLoss",
    "build_loss",
]


def _upcast(x: Tensor) -> Tensor:
    """Half precision -> float32 (the loss is computed in float32 under autocast); float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _fp32_unit(x: Tensor) -> Tensor:
    return F.normalize(_upcast(x), dim=-1)


def _shared_ligand_mask(ligand_ids: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """[B, B] True where j != i shares i's ligand: such a pair is not a negative."""
    if ligand_ids is None:
        return None
    if ligand_ids.shape != (n,):
        raise ValueError(f"ligand_ids must have shape [{n}], got {list(ligand_ids.shape)}")
    same = ligand_ids[:, None] == ligand_ids[None, :]
    return same.fill_diagonal_(False)


class MSELoss(nn.Module):
    """Mean squared error over all elements (the users' baseline)."""

    contrastive = False

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """Mean of (pred - target)^2."""
        return F.mse_loss(_upcast(pred), _upcast(target))


class CosineSimilarityLoss(nn.Module):
    """Mean of 1 - cos(pred, target): aligns directions and ignores norms."""

    contrastive = False

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """Mean over the batch of 1 - cosine similarity."""
        return (1.0 - F.cosine_similarity(_upcast(pred), _upcast(target), dim=-1)).mean()


class InfoNCELoss(nn.Module):
    """CLIP-style InfoNCE with in-batch negatives.

    Both sides are L2-normalised; ``logits = p @ t.T / temperature``; the diagonal holds the
    positives. ``symmetric=True`` averages the pocket->ligand and ligand->pocket
    cross-entropies, ``symmetric=False`` keeps pocket->ligand only. ``learnable=True`` learns
    log(1/temperature), clamped so that 1/temperature stays within [1, 100]. With
    ``ligand_ids``, pairs that share a ligand are dropped from each other's denominators.
    """

    contrastive = True
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

    def logits(self, pred: Tensor, target: Tensor) -> Tensor:
        """[B, B] float32 logits: cosine similarities divided by the temperature."""
        with torch.autocast(pred.device.type, enabled=False):
            return self._logits(pred, target)

    def _logits(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = _fp32_unit(pred), _fp32_unit(target)
        if self.learnable:
            return (p @ t.T) * self._scale().to(p.dtype)
        return (p @ t.T).mul_(1.0 / self.temperature_value)

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """The InfoNCE loss of a batch."""
        with torch.autocast(pred.device.type, enabled=False):
            logits = self._logits(pred, target)
            mask = _shared_ligand_mask(ligand_ids, logits.shape[0], logits.device)
            if mask is not None:
                logits = logits.masked_fill(mask, float("-inf"))
            labels = torch.arange(logits.shape[0], device=logits.device)
            loss = F.cross_entropy(logits, labels)
            if self.symmetric:
                loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
            return loss


class CombinedLoss(nn.Module):
    """alpha * InfoNCE + beta * cosine + gamma * MSE; ``last_components`` keeps the parts."""

    contrastive = True

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

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """The weighted sum; the unweighted parts are kept in ``last_components``."""
        parts = {
            "infonce": self.infonce(pred, target, ligand_ids),
            "cosine": self.cosine(pred, target),
            "mse": self.mse(pred, target),
        }
        self.last_components = {k: v.detach() for k, v in parts.items()}
        return self.alpha * parts["infonce"] + self.beta * parts["cosine"] + self.gamma * parts["mse"]


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

    contrastive = True

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
            t = _fp32_unit(target)
            logits = (_fp32_unit(pred) @ t.T) / self.temperature
            n = logits.shape[0]
            eye = torch.eye(n, dtype=torch.bool, device=logits.device)
            if similarity is not None:
                if similarity.shape != (n, n):
                    raise ValueError(f"similarity must be [{n}, {n}], got {list(similarity.shape)}")
                weights = _upcast(similarity).to(logits.dtype).clamp(0, 1).masked_fill(eye, 1.0)
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


class MultiStageScheduler(nn.Module):
    """The quick-start's three stages: MSE warm-up, InfoNCE, then fine-tuning with the combination.

    Epochs are 0-based: ``epoch < stage1_epochs`` is stage 1, ``epoch < stage3_start`` is
    stage 2, the rest is stage 3; ``stage3_start`` defaults to ``stage1_epochs + stage2_epochs``.
    ``get_loss(epoch)`` returns ``(criterion, stage_name)``; ``get_recommended_lr()`` the learning
    rate of the stage of the last ``get_loss`` call.
    """

    STAGES = ("mse_warmup", "contrastive", "finetune")

    def __init__(
        self,
        stage1_epochs: int = 50,
        stage2_epochs: int = 100,
        stage3_start: int | None = None,
        *,
        lrs: tuple[float, float, float] = (1e-3, 5e-4, 1e-4),
        temperature: float = 0.07,
        alpha: float = 0.5,
        beta: float = 0.3,
        gamma: float = 0.2,
        symmetric: bool = True,
        learnable: bool = False,
    ):
        super().__init__()
        self.stage1_epochs = stage1_epochs
        self.stage3_start = stage1_epochs + stage2_epochs if stage3_start is None else stage3_start
        if stage1_epochs < 0 or self.stage3_start < stage1_epochs:
            raise AblateError(
                f"stage boundaries must satisfy 0 <= stage1_epochs <= stage3_start, "
                f"got {stage1_epochs} and {self.stage3_start}"
            )
        self.lrs = lrs
        infonce = InfoNCELoss(temperature, symmetric=symmetric, learnable=learnable)
        combined = CombinedLoss(alpha, beta, gamma, temperature, symmetric=symmetric)
        combined.infonce = infonce  # one temperature across stages 2 and 3
        self.criteria = nn.ModuleList([MSELoss(), infonce, combined])
        self.stage = 0

    def stage_of(self, epoch: int) -> int:
        """The 0-based stage index of an epoch."""
        if epoch < self.stage1_epochs:
            return 0
        return 1 if epoch < self.stage3_start else 2

    def get_loss(self, epoch: int) -> tuple[nn.Module, str]:
        """The criterion for an epoch and its stage's name."""
        self.stage = self.stage_of(epoch)
        return self.criteria[self.stage], self.STAGES[self.stage]

    def get_recommended_lr(self) -> float:
        """The learning rate of the current stage."""
        return self.lrs[self.stage]


_BUILDERS: dict[str, Any] = {
    "mse": MSELoss,
    "cosine": CosineSimilarityLoss,
    "infonce": InfoNCELoss,
    "combined": CombinedLoss,
    "supcon": SupervisedContrastiveLoss,
    "multistage": MultiStageScheduler,
}


def build_loss(name: str, **params: Any) -> nn.Module:
    """A loss by name (mse, cosine, infonce, combined, supcon; multistage gives the scheduler)."""
    if name not in _BUILDERS:
        raise AblateError(f"unknown loss {name!r}; choose one of {', '.join(_BUILDERS)}")
    try:
        module: nn.Module = _BUILDERS[name](**params)
    except TypeError as e:
        raise AblateError(f"loss {name!r}: {e}") from None
    return module


def _self_check() -> None:
    """Print each loss on a random batch and on a perfectly aligned one."""
    torch.manual_seed(0)
    b, d = 32, 128
    target = torch.randn(b, d)
    pred = torch.randn(b, d)
    print(f"ablate.losses self-check (batch {b}, dim {d}); ln(B) = {math.log(b):.4f}")
    print(f"{'loss':<10} {'random':>10} {'aligned':>10}")
    for name in ("mse", "cosine", "infonce", "combined", "supcon"):
        crit = build_loss(name)
        rand = crit(pred, target).item()
        aligned = crit(target * 2.0, target).item()
        print(f"{name:<10} {rand:>10.4f} {aligned:>10.4f}")
    sched = MultiStageScheduler()
    for epoch in (0, 50, 150):
        crit, stage = sched.get_loss(epoch)
        print(f"multistage epoch {epoch:>3}: {stage:<11} {type(crit).__name__:<15} "
              f"lr {sched.get_recommended_lr():g}")
    equal = InfoNCELoss()(torch.ones(b, d), torch.ones(b, d)).item()
    ok = abs(equal - math.log(b)) < 1e-4
    print(f"InfoNCE at equal similarities: {equal:.4f} (ln B = {math.log(b):.4f}) "
          f"{'OK' if ok else 'MISMATCH'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    _self_check()
