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
    "MemberLosses",
    "MultiStageScheduler",
    "SupervisedContrastiveLoss",
    "build_loss",
]


def _upcast(x: Tensor) -> Tensor:
    """Half precision -> float32 (the loss is computed in float32 under autocast); float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _fp32_unit(x: Tensor) -> Tensor:
    return F.normalize(_upcast(x), dim=-1)


# --------------------------------------------------------------------------------------
# The formulas, on [..., B, D]: any leading dimensions are independent runs (a member axis)
# --------------------------------------------------------------------------------------


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over each batch's elements: [..., B, D] -> [...]."""
    return (_upcast(pred) - _upcast(target)).pow(2).mean(dim=(-2, -1))


def cosine(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over each batch of 1 - cos(pred, target): [..., B, D] -> [...]."""
    return (1.0 - F.cosine_similarity(_upcast(pred), _upcast(target), dim=-1)).mean(dim=-1)


def info_nce(
    pred: Tensor, target: Tensor, scale: Tensor | float, mask: Tensor | None = None,
    symmetric: Tensor | bool = True,
) -> Tensor:
    """InfoNCE of each batch: [..., B, D] -> [...], in float32 (float64 stays) also under autocast.

    ``scale`` is 1 / temperature (a number, or one per leading index); ``mask`` [..., B, B] is True
    where a pair is not a negative (a shared ligand); ``symmetric`` averages both directions (a
    flag, or one per leading index).
    """
    with torch.autocast(pred.device.type, enabled=False):
        logits = _fp32_unit(pred) @ _fp32_unit(target).transpose(-1, -2)
        scaled = logits * scale.to(logits.dtype)[..., None, None] if isinstance(scale, Tensor) else logits.mul_(scale)
        if mask is not None:
            scaled = scaled.masked_fill(mask, float("-inf"))
        forward = _cross_entropy_rows(scaled)
        if symmetric is False:
            return forward
        both = 0.5 * (forward + _cross_entropy_rows(scaled.transpose(-1, -2)))
        return both if symmetric is True else torch.where(symmetric, both, forward)


def _cross_entropy_rows(logits: Tensor) -> Tensor:
    """Mean over rows of the cross-entropy with the diagonal as the target: [..., B, B] -> [...]."""
    b = logits.shape[-1]
    labels = torch.arange(b, device=logits.device).repeat(logits.numel() // (b * b))
    per_row = F.cross_entropy(logits.reshape(-1, b), labels, reduction="none")
    return per_row.view(logits.shape[:-1]).mean(dim=-1)


def shared_ligand_mask(ligand_ids: Tensor) -> Tensor:
    """[..., B] ids -> [..., B, B], True where j != i shares i's ligand: such a pair is not a negative."""
    same = ligand_ids[..., :, None] == ligand_ids[..., None, :]
    eye = torch.eye(ligand_ids.shape[-1], dtype=torch.bool, device=ligand_ids.device)
    return same & ~eye


# --------------------------------------------------------------------------------------
# The losses as modules: criterion(pred, target, ligand_ids=None) on [B, D]
# --------------------------------------------------------------------------------------


class MSELoss(nn.Module):
    """Mean squared error over all elements (the users' baseline)."""

    contrastive = False

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """Mean of (pred - target)^2."""
        return mse(pred, target)


class CosineSimilarityLoss(nn.Module):
    """Mean of 1 - cos(pred, target): aligns directions and ignores norms."""

    contrastive = False

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None) -> Tensor:
        """Mean over the batch of 1 - cosine similarity."""
        return cosine(pred, target)


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
        if ligand_ids is not None and ligand_ids.shape != pred.shape[:1]:
            raise ValueError(f"ligand_ids must have shape [{pred.shape[0]}], got {list(ligand_ids.shape)}")
        mask = None if ligand_ids is None else shared_ligand_mask(ligand_ids)
        scale = self._scale() if self.learnable else 1.0 / self.temperature_value
        return info_nce(pred, target, scale, mask, self.symmetric)


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


class MemberLosses(nn.Module):
    """The losses of K runs trained side by side (an array), evaluated at once on [K, B, D] outputs.

    Each member keeps its own criterion (as ``build_loss`` makes it: its temperature, learnable or
    not, its weights, its multi-stage schedule); ``set_epoch`` reads which loss each member uses in an
    epoch, and ``forward`` evaluates every member's loss with one batched computation per formula.
    A member's value equals its criterion's on its own outputs (the formulas are the same functions).
    """

    def __init__(self, criteria: list[nn.Module], mask_shared_ligands: list[bool]):
        super().__init__()
        self.criteria = nn.ModuleList(criteria)
        self.masking = list(mask_shared_ligands)
        self.current: list[nn.Module] = list(criteria)
        self.stages: list[str | None] = [None] * len(criteria)
        self._plans: dict[tuple[torch.device, torch.dtype], dict[str, Any]] = {}
        """Per device and dtype, the tensors ``forward`` needs that change only with the members' losses."""

    def set_epoch(self, epoch: int) -> list[str | None]:
        """Switch each member to its loss for ``epoch``; returns each member's stage name (None without stages)."""
        for k, criterion in enumerate(self.criteria):
            if isinstance(criterion, MultiStageScheduler):
                self.current[k], self.stages[k] = criterion.get_loss(epoch)
        self._plans = {}
        return list(self.stages)

    def keep(self, members: list[int]) -> None:
        """Drop every member not listed (members stopped early)."""
        self.criteria = nn.ModuleList([self.criteria[k] for k in members])
        self.masking = [self.masking[k] for k in members]
        self.current = [self.current[k] for k in members]
        self.stages = [self.stages[k] for k in members]
        self._plans = {}

    def contrastive(self, k: int) -> bool:
        """Whether member k's loss this epoch depends on the rest of its batch."""
        return bool(getattr(self.current[k], "contrastive", False))

    def masks(self, k: int) -> bool:
        """Whether member k's batches need ligand ids (a contrastive loss that masks shared ligands)."""
        return self.masking[k] and self.contrastive(k)

    def logs_components(self, k: int) -> bool:
        """Whether member k's loss this epoch is a weighted combination (its parts are logged)."""
        return isinstance(self.current[k], CombinedLoss)

    def lr(self, k: int, base: float) -> float:
        """Member k's base learning rate this epoch: its stage's under a multi-stage schedule, else ``base``."""
        criterion = self.criteria[k]
        return criterion.get_recommended_lr() if isinstance(criterion, MultiStageScheduler) else base

    def temperature(self, k: int) -> float | None:
        """Member k's current InfoNCE temperature (None when its loss has none)."""
        infonce = _infonce_of(self.current[k])
        return None if infonce is None else infonce.temperature

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Each member's loss [K] and the unweighted parts [K] of the combined ones (NaN for the others)."""
        dtype = _upcast(pred).dtype
        plan = self._plan(pred.device, dtype)
        weights, zero = plan["weights"], plan["zero"]
        parts: dict[str, Tensor] = {}
        if plan["infonce"]:
            infonces = plan["infonces"]
            scales = plan["scales"]
            if plan["learnable"]:  # a learnable temperature changes every step
                scales = _scales(infonces, pred.device, dtype)
            mask = None
            if ligand_ids is not None:
                mask = shared_ligand_mask(ligand_ids) & plan["on"][:, None, None]
            parts["infonce"] = info_nce(pred, target, scales, mask, plan["symmetric"])
        if plan["cosine"]:
            parts["cosine"] = cosine(pred, target)
        if plan["mse"]:
            parts["mse"] = mse(pred, target)
        loss = zero
        for j, name in enumerate(("infonce", "cosine", "mse")):
            if name in parts:
                w = weights[:, j]
                loss = loss + torch.where(w > 0, w * parts[name], zero)
        if plan["supcon"]:
            values = list(loss.unbind())
            for k in plan["supcon"]:
                ids = None if ligand_ids is None or not self.masks(k) else ligand_ids[k]
                values[k] = self.current[k](pred[k], target[k], ids)
            loss = torch.stack(values)
        logged, nan = plan["logged"], plan["nan"]
        components = {name: torch.where(logged, v.detach(), nan) for name, v in parts.items()}
        return loss, components

    def _plan(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The members' weights, temperatures and flags as tensors, made once per epoch (not per step)."""
        key = (device, dtype)
        if key not in self._plans:
            k_members = len(self.current)
            raw = [_weights(c) for c in self.current]
            infonces = [_infonce_of(c) or _UNIT for c in self.current]
            learnable = any(c.learnable for c in infonces)
            zero = torch.zeros(k_members, dtype=dtype, device=device)
            self._plans[key] = {
                "weights": torch.tensor(raw, dtype=dtype, device=device),  # [K, 3]
                "infonce": any(w[0] > 0 for w in raw),
                "cosine": any(w[1] > 0 for w in raw),
                "mse": any(w[2] > 0 for w in raw),
                "infonces": infonces,
                "learnable": learnable,
                "scales": None if learnable else _scales(infonces, device, dtype),
                "symmetric": torch.tensor([c.symmetric for c in infonces], device=device),
                "on": torch.tensor([self.masks(k) for k in range(k_members)], device=device),
                "supcon": [k for k, c in enumerate(self.current) if isinstance(c, SupervisedContrastiveLoss)],
                "logged": torch.tensor([self.logs_components(k) for k in range(k_members)], device=device),
                "zero": zero,
                "nan": torch.full_like(zero, float("nan")),
            }
        return self._plans[key]


def _scales(infonces: list[InfoNCELoss], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Each member's 1 / temperature [K] (a learnable one as it is now, in the autograd graph)."""
    return torch.stack([(c._scale() if c.learnable else torch.tensor(1.0 / c.temperature_value)).to(device, dtype)
                        for c in infonces])


_UNIT = InfoNCELoss(1.0)
"""A stand-in for members whose loss has no InfoNCE part (its weight is 0 there)."""


def _infonce_of(criterion: nn.Module) -> InfoNCELoss | None:
    if isinstance(criterion, InfoNCELoss):
        return criterion
    if isinstance(criterion, CombinedLoss):
        return criterion.infonce
    return None


def _weights(criterion: nn.Module) -> tuple[float, float, float]:
    """(InfoNCE, cosine, MSE) weights of a criterion (all 0 for SupCon, evaluated apart)."""
    if isinstance(criterion, CombinedLoss):
        return (criterion.alpha, criterion.beta, criterion.gamma)
    if isinstance(criterion, InfoNCELoss):
        return (1.0, 0.0, 0.0)
    if isinstance(criterion, CosineSimilarityLoss):
        return (0.0, 1.0, 0.0)
    if isinstance(criterion, MSELoss):
        return (0.0, 0.0, 1.0)
    return (0.0, 0.0, 0.0)


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
