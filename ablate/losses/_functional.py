"""The formulas the built-in losses share, on ``[..., B, D]``: leading dimensions are independent runs.

A loss module's ``forward`` and its member-axis form (``stack``) both call these, so each formula is
written once. Logits and softmax are computed in float32 under autocast (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Half precision -> float32 (the loss is computed in float32 under autocast); float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def fp32_unit(x: Tensor) -> Tensor:
    """Unit-normalised rows, in float32 at least."""
    return F.normalize(upcast(x), dim=-1)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over each batch's elements: [..., B, D] -> [...]."""
    return (upcast(pred) - upcast(target)).pow(2).mean(dim=(-2, -1))


def cosine(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over each batch of 1 - cos(pred, target): [..., B, D] -> [...]."""
    return (1.0 - F.cosine_similarity(upcast(pred), upcast(target), dim=-1)).mean(dim=-1)


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
        logits = fp32_unit(pred) @ fp32_unit(target).transpose(-1, -2)
        scaled = logits * scale.to(logits.dtype)[..., None, None] if isinstance(scale, Tensor) else logits.mul_(scale)
        if mask is not None:
            scaled = scaled.masked_fill(mask, float("-inf"))
        forward = cross_entropy_rows(scaled)
        if symmetric is False:
            return forward
        both = 0.5 * (forward + cross_entropy_rows(scaled.transpose(-1, -2)))
        return both if symmetric is True else torch.where(symmetric, both, forward)


def cross_entropy_rows(logits: Tensor) -> Tensor:
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


def check_ids(pred: Tensor, ligand_ids: Tensor | None) -> None:
    """Ligand ids, when given, have one entry per row of the batch."""
    if ligand_ids is not None and ligand_ids.shape != pred.shape[:-1]:
        raise ValueError(f"ligand_ids must have shape {list(pred.shape[:-1])}, got {list(ligand_ids.shape)}")
