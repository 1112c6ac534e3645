"""Virtual-screening metrics: EF, BEDROC and AUROC per query (RDKit's definitions, pessimistic ties),
and their mean over the distinct pockets of a set of pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ablate.metrics.retrieval import CHUNK_ELEMENTS, _first_occurrence, _unit

SCREENING_FRACTIONS = (0.005, 0.01, 0.02, 0.05)
"""Fractions of the library for the enrichment factors (DrugCLIP's 0.5, 1, 2 and 5 %)."""

BEDROC_ALPHA = 80.5
"""BEDROC's early-recognition weight (Truchon & Bayly 2007; 80% of the score from the top 2%)."""


def _ef_key(fraction: float) -> str:
    return f"ef{100 * fraction:g}"


def _screening_keys(fractions: Sequence[float]) -> list[str]:
    return [_ef_key(x) for x in fractions] + ["bedroc", "auroc"]


def _check_screening_args(fractions: Sequence[float], alpha: float) -> None:
    if not all(0.0 < x <= 1.0 for x in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    if not alpha > 0.0:
        raise ValueError(f"alpha must be positive, got {alpha}")


def _cut(n: int, fraction: float) -> int:
    """Molecules in the top ``fraction`` of n: RDKit's ``math.ceil(numMol * f)``, at least one."""
    return max(1, math.ceil(n * fraction))


def _bedroc_bounds(n_actives: Tensor, n: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """RDKit's RIE normaliser (per active) and RIEmin, RIEmax, in a form that cannot overflow."""
    ra = n_actives / n
    em = -math.expm1(-alpha)  # 1 - e^-alpha
    denom = em / (n * math.expm1(alpha / n))  # (1/N) (1 - e^-a) / (e^(a/N) - 1): E[e^(-a r/N)], r uniform
    rie_max = -torch.expm1(-alpha * ra) / (ra * em)
    rie_min = rie_max * torch.exp(alpha * (ra - 1.0))  # (1 - e^(a ra)) / (ra (1 - e^a)), rewritten
    return denom * torch.ones_like(ra), rie_min, rie_max


def _screening_from_positions(
    position: Tensor, real: Tensor, n_actives: Tensor, n: int, fractions: Sequence[float], alpha: float
) -> dict[str, Tensor]:
    """Per-query metrics from the 1-based positions ``[Q, A]`` of each query's actives (``real`` marks them)."""
    pos = position.double()
    na = n_actives.double()
    undefined = (n_actives == 0) | (n_actives == n)
    nan = torch.full_like(na, float("nan"))
    out: dict[str, Tensor] = {}
    for x in fractions:
        m = _cut(n, x)
        hits = ((pos <= m) & real).sum(dim=1).double()
        out[_ef_key(x)] = torch.where(undefined, nan, hits * n / (m * na))
    denom, rie_min, rie_max = _bedroc_bounds(na, n, alpha)
    rie = torch.exp(-alpha * pos / n).masked_fill(~real, 0.0).sum(dim=1) / (na * denom)
    out["bedroc"] = torch.where(undefined, nan, (rie - rie_min) / (rie_max - rie_min))
    # the k-th best active sits at k + (inactives ahead of it), so the (inactive, active) pairs in the
    # wrong order number sum(p_k) - A (A + 1) / 2
    misordered = pos.masked_fill(~real, 0.0).sum(dim=1) - na * (na + 1) / 2
    out["auroc"] = torch.where(undefined, nan, 1.0 - misordered / (na * (n - na)))
    return out


def _active_positions(
    scores: Tensor, query: Tensor, item: Tensor, counts: Tensor, buf: Tensor
) -> tuple[Tensor, Tensor]:
    """1-based pessimistic positions of every query's actives, ``[Q, A]``, and the mask of real (unpadded) ones.

    ``scores`` is ``[Q, N]`` with NaN already replaced by -inf (it is not changed); the actives are the
    pairs ``(query[j], item[j])``, sorted by query, ``counts[q]`` of them for query q; ``buf`` is int32
    scratch of ``scores``' shape. The active that is k-th best among its query's actives sits behind the
    k - 1 better actives and every inactive scoring at least as high: one binary search of each score among
    the query's sorted active scores and one histogram count those, instead of sorting whole rows.
    """
    nq = scores.shape[0]
    width = max(int(counts.max()), 1) if counts.numel() else 1
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(item.shape[0], device=scores.device) - start[query]
    bounds = torch.full((nq, width), float("inf"), dtype=scores.dtype, device=scores.device)  # padding sorts last
    bounds[query, slot] = scores[query, item]
    bounds = bounds.sort(dim=1).values
    # per item: how many of the query's actives score <= it (an inactive that ties goes ahead of them)
    idx = torch.searchsorted(bounds, scores, right=True, out_int32=True, out=buf)
    idx[query, item] = 0  # an active is nobody's inactive
    idx += (torch.arange(nq, device=scores.device, dtype=idx.dtype) * (width + 1))[:, None]
    hist = torch.bincount(idx.view(-1), minlength=nq * (width + 1)).view(nq, width + 1)
    # inactives ahead of the i-th lowest active (0-based): those whose count exceeds i
    ahead = hist.flip(1).cumsum(1).flip(1)[:, 1:]
    i = torch.arange(width, device=scores.device)
    real = i[None, :] < counts[:, None]
    better_actives = (counts[:, None] - 1 - i[None, :]).clamp_min(0)
    return 1 + better_actives + ahead, real


def screening(
    scores: Tensor,
    actives: Tensor,
    fractions: Sequence[float] = SCREENING_FRACTIONS,
    alpha: float = BEDROC_ALPHA,
) -> dict[str, float]:
    """Virtual-screening metrics of one query: ``ef<percent>`` per fraction, ``bedroc``, ``auroc``.

    ``scores`` ranks a library of N molecules (higher is better; NaN counts as -inf, the lowest) and
    ``actives`` is a boolean mask of the actives. The ranking breaks ties pessimistically: an active goes
    after every inactive of equal score. With A actives and the active positions p_1 < ... < p_A, as in
    RDKit's ``rdkit.ML.Scoring.Scoring``: EF at fraction x is (actives in the top m) * N / (m * A) with
    m = max(1, ceil(N x)); BEDROC is (RIE - RIEmin) / (RIEmax - RIEmin) with
    RIE = sum_i exp(-alpha p_i / N) / (A/N (1 - e^-alpha) / (e^(alpha/N) - 1)); AUROC is the ROC area, the
    fraction of (active, inactive) pairs with the active ranked first. With no actives or no inactives every
    value is NaN: there is no ranking to judge.
    """
    _check_screening_args(fractions, alpha)
    if scores.ndim != 1 or actives.shape != scores.shape:
        shapes = f"{tuple(scores.shape)}, {tuple(actives.shape)}"
        raise ValueError(f"scores and actives must be 1-D of one length, got {shapes}")
    n = scores.shape[0]
    if n == 0:
        raise ValueError("the library is empty")
    s = scores.detach()
    s = s.double() if not s.is_floating_point() else s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    s = torch.nan_to_num(s, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))[None, :].contiguous()
    item = torch.nonzero(actives.to(device=s.device, dtype=torch.bool)).view(-1)
    counts = torch.tensor([item.shape[0]], device=s.device)
    query = torch.zeros_like(item)
    buf = torch.empty(s.shape, dtype=torch.int32, device=s.device)
    position, real = _active_positions(s, query, item, counts, buf)
    values = _screening_from_positions(position, real, counts, n, fractions, alpha)
    return {key: float(v[0]) for key, v in values.items()}


def _random_screening(n_actives: Tensor, n: int, fractions: Sequence[float], alpha: float) -> dict[str, Tensor]:
    na = n_actives.double()
    undefined = (n_actives == 0) | (n_actives == n)
    nan = torch.full_like(na, float("nan"))
    out = {_ef_key(x): torch.where(undefined, nan, torch.ones_like(na)) for x in fractions}
    # E[RIE] = 1 exactly: RIE's normaliser is E[exp(-alpha r / N)] for r uniform on 1..N
    _, rie_min, rie_max = _bedroc_bounds(na, n, alpha)
    out["bedroc"] = torch.where(undefined, nan, (1.0 - rie_min) / (rie_max - rie_min))
    out["auroc"] = torch.where(undefined, nan, torch.full_like(na, 0.5))
    return out


def random_screening(
    n_actives: int,
    n: int,
    fractions: Sequence[float] = SCREENING_FRACTIONS,
    alpha: float = BEDROC_ALPHA,
) -> dict[str, float]:
    """Expected :func:`screening` metrics of a uniformly random ranking of n molecules, n_actives of them active.

    Exact: the top m of a random permutation holds m A / N actives on average, so every EF is 1; AUROC
    is 0.5; BEDROC is linear in sum_i exp(-alpha p_i / N), whose mean makes RIE exactly 1, so it is
    (1 - RIEmin) / (RIEmax - RIEmin). NaN for every key when n_actives is 0 or n, as in screening().
    """
    _check_screening_args(fractions, alpha)
    if n < 1 or not 0 <= n_actives <= n:
        raise ValueError(f"need 0 <= n_actives <= n and n >= 1, got n_actives={n_actives}, n={n}")
    values = _random_screening(torch.tensor([n_actives]), n, fractions, alpha)
    return {key: float(v[0]) for key, v in values.items()}


def compute_screening_metrics(
    pocket_embeddings: Tensor,
    ligand_embeddings: Tensor,
    pocket_ids: Tensor | None = None,
    ligand_ids: Tensor | None = None,
    *,
    fractions: Sequence[float] = SCREENING_FRACTIONS,
    alpha: float = BEDROC_ALPHA,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, float]:
    """Each distinct pocket screens the library of distinct ligands; :func:`screening` metrics over pockets.

    Row i pairs a pocket with a ligand. Rows with one pocket id are one pocket (without ids, each row is
    one); rows with one ligand id are one ligand, embedded by its first row (without ids, each row is
    one). A pocket's actives are the ligands of its rows, and a ligand's score is its highest cosine
    similarity over the pocket's rows (DrugCLIP's rule for several conformations). Returns the mean over
    pockets under the plain keys (``ef1``, ``bedroc``, ...), the median under ``<key>_median``, the mean
    expected score of a random ranking under ``random_<key>``, and ``n_pockets``, ``n_ligands``. Pockets
    whose actives are the whole library have NaN metrics and are left out of means and medians. Scores are
    made for about ``chunk_elements`` (pocket, ligand) pairs at a time, never the whole matrix.
    """
    return screening_by_member(pocket_embeddings[None], ligand_embeddings, pocket_ids, ligand_ids,
                               fractions=fractions, alpha=alpha, chunk_elements=chunk_elements)[0]


def screening_by_member(
    pocket_embeddings: Tensor,
    ligand_embeddings: Tensor,
    pocket_ids: Tensor | None = None,
    ligand_ids: Tensor | None = None,
    *,
    fractions: Sequence[float] = SCREENING_FRACTIONS,
    alpha: float = BEDROC_ALPHA,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[dict[str, float]]:
    """:func:`compute_screening_metrics` for every member k of ``pocket_embeddings`` ``[K, rows, D]`` at once
    (the members' pockets screen the same library; a chunk holds every member's queries)."""
    _check_screening_args(fractions, alpha)
    p, lig = pocket_embeddings.detach(), ligand_embeddings.detach()
    k_members, rows = p.shape[0], p.shape[1]
    if rows == 0 or lig.shape[0] != rows:
        raise ValueError(f"need as many ligand rows as pocket rows (and some): {rows} pocket, {lig.shape[0]} ligand")
    for name, ids in (("pocket_ids", pocket_ids), ("ligand_ids", ligand_ids)):
        if ids is not None and tuple(ids.shape) != (rows,):
            raise ValueError(f"{name} must be 1-D with one id per row ({rows}), got shape {tuple(ids.shape)}")
    lib = _library(p, lig, pocket_ids, ligand_ids)
    score_q, score_pocket, row_ptr = _queries(p, pocket_ids, lib.pocket_of_row, lib.n_pockets)
    g = lib.ligands
    if g.dtype != score_q.dtype:  # e.g. float64 pockets against float32 ligands
        dtype = torch.promote_types(g.dtype, score_q.dtype)
        score_q, g = score_q.to(dtype), g.to(dtype)
    n, n_pockets, device = g.shape[0], lib.n_pockets, p.device
    step = max(1, min(n_pockets, chunk_elements // (n * k_members)))  # pockets per chunk (for every member)
    buf = torch.empty((k_members, step, n), dtype=score_q.dtype, device=device)
    sim = torch.empty((k_members, step, n), dtype=score_q.dtype, device=device) if score_q.shape[1] > n_pockets \
        else buf
    idx_buf = torch.empty((k_members * step, n), dtype=torch.int32, device=device)
    parts: dict[str, list[Tensor]] = {key: [] for key in _screening_keys(fractions)}
    for p0 in range(0, n_pockets, step):
        p1 = min(p0 + step, n_pockets)
        width = p1 - p0
        s = _chunk_scores(buf[:, :width], sim, score_q, g, score_pocket, row_ptr[p0], row_ptr[p1], p0, step)
        a0, a1 = lib.act_ptr[p0], lib.act_ptr[p1]
        # every member's queries of the chunk, one after another: query k * width + (pocket - p0)
        offsets = (torch.arange(k_members, device=device) * width).repeat_interleave(a1 - a0)
        counts = lib.act_counts[p0:p1].repeat(k_members)
        position, real = _active_positions(
            s.reshape(k_members * width, n), (lib.act_pocket[a0:a1] - p0).repeat(k_members) + offsets,
            lib.act_item[a0:a1].repeat(k_members), counts, idx_buf[: k_members * width],
        )
        for key, v in _screening_from_positions(position, real, counts, n, fractions, alpha).items():
            parts[key].append(v.view(k_members, width))
    floors = _random_screening(lib.act_counts, n, fractions, alpha)
    return [_member_summary(parts, floors, k, n_pockets, n) for k in range(k_members)]


class _Library(NamedTuple):
    """The screened library: distinct ligands (unit rows), each row's pocket, and each pocket's actives."""

    ligands: Tensor
    pocket_of_row: Tensor
    n_pockets: int
    act_pocket: Tensor
    """Distinct (pocket, active) pairs, sorted by pocket: the pocket of each ..."""
    act_item: Tensor
    """... and its active's index in ``ligands``."""
    act_counts: Tensor
    act_ptr: list[int]


def _library(p: Tensor, lig: Tensor, pocket_ids: Tensor | None, ligand_ids: Tensor | None) -> _Library:
    rows, device = p.shape[1], p.device
    if ligand_ids is None:
        lig_of_row, g = torch.arange(rows, device=device), _unit(lig)
    else:
        _, first = _first_occurrence(ligand_ids.to(device))
        lig_of_row = torch.unique(ligand_ids.to(device), return_inverse=True)[1]
        g = _unit(lig[first])
    if pocket_ids is None:
        pocket_of_row = torch.arange(rows, device=device)
    else:
        pocket_of_row = torch.unique(pocket_ids.to(device), return_inverse=True)[1]
    n_pockets, n = int(pocket_of_row.max()) + 1, g.shape[0]
    pairs = torch.unique(pocket_of_row * n + lig_of_row)  # distinct (pocket, active), sorted by pocket
    act_counts = torch.bincount(pairs // n, minlength=n_pockets)
    return _Library(g, pocket_of_row, n_pockets, pairs // n, pairs % n, act_counts,
                    [0, *torch.cumsum(act_counts, 0).tolist()])


def _queries(p: Tensor, pocket_ids: Tensor | None, pocket_of_row: Tensor, n_pockets: int
             ) -> tuple[Tensor, Tensor, list[int]]:
    """The rows to score (unit, [K, rows', D]) grouped by pocket, each row's pocket, and where each pocket's rows
    start. A pocket's rows often repeat one embedding (one row per active), and the max over copies is the copy,
    so a row equal to the one before it in its pocket is left out."""
    rows = p.shape[1]
    if pocket_ids is None:
        score_q, score_pocket = _unit(p), pocket_of_row
    else:
        order = torch.argsort(pocket_of_row, stable=True)
        ps, score_pocket = p[:, order], pocket_of_row[order]
        if n_pockets < rows:
            keep = torch.ones(rows, dtype=torch.bool, device=p.device)
            keep[1:] = (score_pocket[1:] != score_pocket[:-1]) | (ps[:, 1:] != ps[:, :-1]).any(dim=-1).any(dim=0)
            ps, score_pocket = ps[:, keep], score_pocket[keep]
        score_q = _unit(ps)
    row_ptr = [0, *torch.cumsum(torch.bincount(score_pocket, minlength=n_pockets), 0).tolist()]
    return score_q, score_pocket, row_ptr


def _chunk_scores(s: Tensor, sim: Tensor, score_q: Tensor, g: Tensor, score_pocket: Tensor, r0: int, r1: int,
                  p0: int, step: int) -> Tensor:
    """The scores [K, width, n] of the chunk's pockets (from ``p0``; their rows ``r0:r1``) against the library,
    written into ``s``: a pocket's score for a ligand is the max over its rows."""
    width, n = s.shape[1], s.shape[2]
    if r1 - r0 == width:  # one row per pocket
        torch.matmul(score_q[:, r0:r1], g.T, out=s)
        return s.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    s.fill_(float("-inf"))
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        t = torch.matmul(score_q[:, a:b], g.T, out=sim[:, : b - a])
        t.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        target = (score_pocket[a:b] - p0)[None, :, None].expand(s.shape[0], -1, n)
        s.scatter_reduce_(1, target, t, reduce="amax")
    return s


def _member_summary(parts: dict[str, list[Tensor]], floors: dict[str, Tensor], k: int, n_pockets: int, n: int
                    ) -> dict[str, float]:
    """Member k's means and medians over pockets, what a random ranking scores, and the library's size."""
    member: dict[str, float] = {}
    for key, chunks in parts.items():
        v = torch.cat([c[k] for c in chunks])
        member[key] = float(v.nanmean())
        member[f"{key}_median"] = float(v.nanquantile(0.5)) if v.numel() else float("nan")
    for key, v in floors.items():
        member[f"random_{key}"] = float(v.nanmean())
    member["n_pockets"] = float(n_pockets)
    member["n_ligands"] = float(n)
    return member
