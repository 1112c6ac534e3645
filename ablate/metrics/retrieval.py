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
        target: Tensor | None = torch.arange(nq, device=q.device)
    else:
        target = _single_target(query_labels, gallery_labels)
    step = max(1, min(nq, chunk_elements // max(ng, 1)))
    scores = torch.empty((step, ng), dtype=q.dtype, device=q.device)  # reused: no page faults per chunk
    one = torch.ones((), dtype=q.dtype, device=q.device)
    out = torch.empty(nq, dtype=torch.long, device=q.device)
    for start in range(0, nq, step):
        stop = min(start + step, nq)
        s = torch.mm(q[start:stop], g.T, out=scores[: stop - start])
        if target is not None:  # one correct item per query: its score is in s
            own = s.gather(1, target[start:stop, None])
            # count the items scoring >= the correct one, in place: s - own >= 0 -> 1, else 0
            # (the correct one counts itself, which makes the count the 1-based rank)
            at_least = s.sub_(own).heaviside_(one).nan_to_num_(0.0).sum(dim=1)
            # a NaN correct score is the lowest possible: every wrong item beats it
            out[start:stop] = torch.where(torch.isnan(own[:, 0]), ng, at_least.long())
        else:
            assert query_labels is not None and gallery_labels is not None
            correct = query_labels[start:stop, None] == gallery_labels[None, :]
            best = torch.nan_to_num(s.masked_fill(~correct, float("-inf")), nan=float("-inf")).amax(1, keepdim=True)
            beaten = ((s >= best) & ~correct).sum(dim=1)
            wrong = ng - correct.sum(dim=1)
            out[start:stop] = 1 + torch.where(torch.isinf(best[:, 0]), wrong, beaten)
    return out


def _single_target(query_labels: Tensor, gallery_labels: Tensor) -> Tensor | None:
    """Where every label occurs once in the gallery: the gallery index of each query's label."""
    order = torch.argsort(gallery_labels)
    ordered = gallery_labels[order]
    if ordered.numel() > 1 and bool((ordered[1:] == ordered[:-1]).any()):
        return None
    pos = torch.searchsorted(ordered, query_labels).clamp(max=ordered.numel() - 1)
    if not bool((ordered[pos] == query_labels).all()):
        raise ValueError("every query label must occur in the gallery")
    return order[pos]


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
    step = max(1, min(n, chunk_elements // n))
    buf = torch.empty((step, n), dtype=u.dtype, device=u.device)
    parts = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        e = torch.mm(u[start:stop], u.T, out=buf[: stop - start])
        e.sub_(1.0).mul_(2.0 * t)  # -t ||a - b||^2 = 2t (a.b - 1) for unit vectors
        rows = torch.arange(start, stop, device=u.device)
        e[rows - start, rows] = float("-inf")  # leave out the pairs (a, a)
        top = e.amax(dim=1, keepdim=True)  # a row-wise logsumexp, in place
        parts.append(e.sub_(top).exp_().sum(dim=1).log() + top[:, 0])
    return float(torch.logsumexp(torch.cat(parts).double(), dim=0) - math.log(n * (n - 1)))


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


def retrieval_by_member(
    pocket_embeddings: Tensor,
    ligand_embeddings: Tensor,
    ligand_ids: Tensor,
    top_k: Sequence[int] = (1, 5, 10),
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[dict[str, float]]:
    """``compute_retrieval_metrics(p[k], ligands, ligand_ids=ids, reverse=False)`` for every member k of
    ``pocket_embeddings`` ``[K, N, D]`` at once: one ranking pass over all members' queries."""
    p, lig = pocket_embeddings.detach(), ligand_embeddings.detach()
    k_members, n = p.shape[0], p.shape[1]
    ids = ligand_ids.to(p.device)
    uniq, first = _first_occurrence(ids)
    r = ranks(p.reshape(k_members * n, -1), lig[first], ids.repeat(k_members), uniq,
              chunk_elements=chunk_elements).view(k_members, n)
    unit_p, unit_l = _unit(p), _unit(lig)
    cos = (unit_p * unit_l).sum(-1).mean(-1)
    align = (unit_p - unit_l).norm(dim=-1).pow(2).mean(-1)
    spreads = (1.0 - unit_p.mean(1).pow(2).sum(-1)).clamp_min(0).sqrt()
    out = []
    for k in range(k_members):
        m = _summarise(r[k], top_k, "")
        m.update(mean_cosine=float(cos[k]), alignment=float(align[k]),
                 uniformity=uniformity(p[k], chunk_elements=chunk_elements), spread=float(spreads[k]))
        out.append(m)
    return out
