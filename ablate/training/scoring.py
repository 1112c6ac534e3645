"""Scoring a run's embeddings on a split: the loss, retrieval and screening metrics under the vocabulary's keys."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from ablate.losses._members import MemberLosses
from ablate.metrics import retrieval_by_member, screening_by_member
from ablate.training.data import PairedEmbeddings
from ablate.vocabulary import SCREENING_METRICS


@torch.no_grad()
def score(pred: Tensor, data: PairedEmbeddings, losses: MemberLosses, split: str, batch_size: int
          ) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Each member's metrics ``split/...`` for its embeddings ``pred`` [K, N, D] of ``data``, and what a random
    ranking scores on ``data`` (``split/ef1`` -> 1.0, ...). A contrastive loss is taken over batches of
    ``batch_size`` pairs (the training batch), and so are the per-sample ones beside it; alone, a per-sample loss
    is taken over the whole set (the same value, up to rounding)."""
    k_members = pred.shape[0]
    target = data.ligand.expand(k_members, -1, -1)
    ids = data.ligand_id.expand(k_members, -1)
    n_batches = max(1, math.ceil(len(data) / batch_size))
    if n_batches > 1 and any(losses.contrastive(k) for k in range(k_members)):
        # a contrastive loss is taken over batches of the training size (its value depends on the batch); the
        # per-sample losses beside it too, as the batch-size-weighted mean (their whole-set value, up to rounding)
        total = torch.zeros(k_members, dtype=pred.dtype, device=pred.device)
        for part in torch.arange(len(data), device=pred.device).tensor_split(n_batches):
            total += losses(pred[:, part], target[:, part], ids[:, part])[0] * part.numel()
        vloss = (total / len(data)).tolist()
    else:
        vloss = losses(pred, target, ids)[0].tolist()
    retrieval = retrieval_by_member(pred, data.ligand, data.ligand_id)
    screening = screening_by_member(pred, data.ligand, data.pocket_id, data.ligand_id)
    floors = {f"{split}/{key[len('random_'):]}": v for key, v in screening[0].items() if key.startswith("random_")}
    out = []
    for k in range(k_members):
        r, sc = retrieval[k], screening[k]
        metrics = {
            f"{split}/loss": float(vloss[k]),
            f"{split}/cosine": r["mean_cosine"],
            f"{split}/top1": r["top1_accuracy"],
            f"{split}/top5": r["top5_accuracy"],
            f"{split}/top10": r["top10_accuracy"],
            f"{split}/mrr": r["mrr"],
            f"{split}/median_rank": r["median_rank"],
            f"{split}/alignment": r["alignment"],
            f"{split}/uniformity": r["uniformity"],
            f"{split}/spread": r["spread"],
        }
        for key in ("ef0.5", "ef1", "ef2", "ef5", "bedroc", "auroc"):
            metrics[f"{split}/{key}"] = sc[key]
        for key in SCREENING_METRICS:
            name = key.removeprefix("val/")
            metrics[f"{split}/{name}_median"] = sc[f"{name}_median"]
        out.append(metrics)
    return out, floors


def embed(model: nn.Module, pocket: Tensor, chunk: int, context: Callable[[], AbstractContextManager[Any]]
           ) -> Tensor:
    """A model's embeddings of pocket rows, in chunks, in eval mode and ``context`` (autocast or none), widened."""
    model.eval()
    outs = []
    for xc in pocket.split(chunk):
        with context():
            outs.append(widen(model(xc)))
    return torch.cat(outs)


def widen(x: Tensor) -> Tensor:
    """Half precision -> float32; float32 and float64 stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
