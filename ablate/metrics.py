"""Retrieval and embedding-quality metrics: pure functions on tensors.

Ranks break ties pessimistically: a query's rank is one plus the number of wrong candidates
that score at least as high as its best correct candidate, so a constant model scores at chance
or worse, never perfectly; a NaN score counts as the lowest possible. The similarity matrix is
never held whole: queries are scored in chunks of rows, so memory is O(chunk x gallery).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24
"""Similarity scores held at once (64 MiB in float32)."""


def _unit(x: Tensor) -> Tensor:
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return F.normalize(x, dim=-1)


def ranks(
    queries: Tensor,
    gallery: Tensor,
    query_labels: Tensor | None = None,
    gallery_labels: Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """1-based rank of each query's best correct gallery item under cosine similarity.

    The correct items of query i are those with ``gallery_labels == query_labels[i]``; without
    labels, query i's only correct item is gallery item i. Ties count against the query.
    """
    q, g = _unit(queries), _unit(gallery)
    nq, ng = q.shape[0], g.shape[0]
    if query_labels is None or gallery_labels is None:
        if nq != ng:
            raise ValueError(f"without labels, queries ({nq}) and gallery ({ng}) must pair up")
        query_labels = torch.arange(nq, device=q.device)
        gallery_labels = torch.arange(ng, device=g.device)
    step = max(1, chunk_elements // max(ng, 1))
    out = torch.empty(nq, dtype=torch.long, device=q.device)
    for start in range(0, nq, step):
        s = q[start : start + step] @ g.T
        s = torch.nan_to_num(s, nan=float("-inf"))
        correct = query_labels[start : start + step, None] == gallery_labels[None, :]
        best = s.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
        beaten = (s >= best) & ~correct
        out[start : start + step] = 1 + beaten.sum(dim=1)
    return out


def _summarise(r: Tensor, top_k: Sequence[int], prefix: str) -> dict[str, float]:
    rf = r.double()
    out = {f"{prefix}top{k}_accuracy": float((r <= k).double().mean()) for k in top_k}
    out[f"{prefix}mrr"] = float((1.0 / rf).mean())
    out[f"{prefix}median_rank"] = float(rf.median() if r.numel() % 2 else rf.quantile(0.5))
    return out


def mean_cosine(pred: Tensor, target: Tensor) -> float:
    """Mean cosine similarity of the matched pairs (pred[i], target[i])."""
    return float((_unit(pred) * _unit(target)).sum(-1).mean())


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola (2020): mean ||f(x) - f(y)||^alpha over positive pairs of unit vectors."""
    return float((_unit(x) - _unit(y)).norm(dim=1).pow(alpha).mean())


def uniformity(x: Tensor, t: float = 2.0, chunk_elements: int = CHUNK_ELEMENTS) -> float:
    """Wang & Isola (2020): log of the mean of exp(-t ||f(a) - f(b)||^2) over distinct pairs."""
    u = _unit(x)
    n = u.shape[0]
    if n < 2:
        return float("nan")
    step = max(1, chunk_elements // n)
    parts = []
    for start in range(0, n, step):
        sq = (2.0 - 2.0 * (u[start : start + step] @ u.T)).clamp_min(0)
        e = -t * sq
        rows = torch.arange(start, min(start + step, n), device=u.device)
        e[rows - start, rows] = float("-inf")  # drop the pairs (a, a)
        parts.append(torch.logsumexp(e.flatten().double(), dim=0))
    return float(torch.logsumexp(torch.stack(parts), dim=0) - math.log(n * (n - 1)))


def spread(x: Tensor) -> float:
    """Root-mean-square distance of unit vectors to their centroid: 0 when collapsed."""
    u = _unit(x)
    return float((1.0 - u.mean(0).pow(2).sum()).clamp_min(0).sqrt())


def compute_retrieval_metrics(
    pocket_embeddings: Tensor,
    ligand_embeddings: Tensor,
    top_k: Sequence[int] = (1, 5, 10),
    ligand_ids: Tensor | None = None,
    *,
    reverse: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, float]:
    """Retrieval of ligands by pockets (and pockets by ligands, keys prefixed ``reverse_``).

    Query i's answer is ligand i. With ``ligand_ids`` the gallery holds each ligand once (its
    first row) and any pocket of a ligand matches it. Rates are fractions in [0, 1]; the dict
    also holds ``mean_cosine``, ``alignment``, ``uniformity`` and ``spread`` of the pockets.
    """
    p, lig = pocket_embeddings.detach(), ligand_embeddings.detach()
    if p.shape[0] != lig.shape[0]:
        raise ValueError(f"{p.shape[0]} pocket rows but {lig.shape[0]} ligand rows")
    if ligand_ids is None:
        fwd = ranks(p, lig, chunk_elements=chunk_elements)
        rev = ranks(lig, p, chunk_elements=chunk_elements) if reverse else None
    else:
        ids = ligand_ids.to(p.device)
        uniq, first = _first_occurrence(ids)
        gallery = lig[first]
        fwd = ranks(p, gallery, ids, uniq, chunk_elements=chunk_elements)
        rev = ranks(gallery, p, uniq, ids, chunk_elements=chunk_elements) if reverse else None
    out = _summarise(fwd, top_k, "")
    if rev is not None:
        out.update(_summarise(rev, top_k, "reverse_"))
    out["mean_cosine"] = mean_cosine(p, lig)
    out["alignment"] = alignment(p, lig)
    out["uniformity"] = uniformity(p, chunk_elements=chunk_elements)
    out["spread"] = spread(p)
    return out


def _first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct ids and, for each, the index of its first row."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return uniq, first
