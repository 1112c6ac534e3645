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


# --------------------------------------------------------------------------------------
# Virtual screening: EF, BEDROC and AUROC per query (RDKit's definitions, pessimistic ties)
# --------------------------------------------------------------------------------------

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
    _check_screening_args(fractions, alpha)
    p, lig = pocket_embeddings.detach(), ligand_embeddings.detach()
    rows = p.shape[0]
    if rows == 0 or lig.shape[0] != rows:
        raise ValueError(f"need as many ligand rows as pocket rows (and some): {rows} pocket, {lig.shape[0]} ligand")
    for name, ids in (("pocket_ids", pocket_ids), ("ligand_ids", ligand_ids)):
        if ids is not None and tuple(ids.shape) != (rows,):
            raise ValueError(f"{name} must be 1-D with one id per row ({rows}), got shape {tuple(ids.shape)}")
    device = p.device
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
    act_pocket, act_item = pairs // n, pairs % n
    act_counts = torch.bincount(act_pocket, minlength=n_pockets)
    act_ptr = [0, *torch.cumsum(act_counts, 0).tolist()]

    # the rows to score, grouped by pocket; a pocket's rows often repeat one embedding (one row per active),
    # and the max over copies is the copy, so a row equal to the one before it in its pocket is left out
    if pocket_ids is None:
        score_q, score_pocket = _unit(p), pocket_of_row
    else:
        order = torch.argsort(pocket_of_row, stable=True)
        ps, score_pocket = p[order], pocket_of_row[order]
        if n_pockets < rows:
            keep = torch.ones(rows, dtype=torch.bool, device=device)
            keep[1:] = (score_pocket[1:] != score_pocket[:-1]) | (ps[1:] != ps[:-1]).any(dim=1)
            ps, score_pocket = ps[keep], score_pocket[keep]
        score_q = _unit(ps)
        del ps
    row_ptr = [0, *torch.cumsum(torch.bincount(score_pocket, minlength=n_pockets), 0).tolist()]
    if g.dtype != score_q.dtype:  # e.g. float64 pockets against float32 ligands
        dtype = torch.promote_types(g.dtype, score_q.dtype)
        score_q, g = score_q.to(dtype), g.to(dtype)

    step = max(1, min(n_pockets, chunk_elements // n))  # pockets per chunk, and rows per matrix product
    buf = torch.empty((step, n), dtype=score_q.dtype, device=device)
    sim = torch.empty((step, n), dtype=score_q.dtype, device=device) if score_q.shape[0] > n_pockets else buf
    idx_buf = torch.empty((step, n), dtype=torch.int32, device=device)
    parts: dict[str, list[Tensor]] = {key: [] for key in _screening_keys(fractions)}
    for p0 in range(0, n_pockets, step):
        p1 = min(p0 + step, n_pockets)
        s = buf[: p1 - p0]
        r0, r1 = row_ptr[p0], row_ptr[p1]
        if r1 - r0 == p1 - p0:  # one row per pocket
            torch.mm(score_q[r0:r1], g.T, out=s)
            s.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        else:  # the pocket's score is the max over its rows
            s.fill_(float("-inf"))
            for a in range(r0, r1, step):
                b = min(a + step, r1)
                t = torch.mm(score_q[a:b], g.T, out=sim[: b - a])
                t.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
                s.scatter_reduce_(0, (score_pocket[a:b] - p0)[:, None].expand(-1, n), t, reduce="amax")
        a0, a1 = act_ptr[p0], act_ptr[p1]
        position, real = _active_positions(
            s, act_pocket[a0:a1] - p0, act_item[a0:a1], act_counts[p0:p1], idx_buf[: p1 - p0]
        )
        for key, v in _screening_from_positions(position, real, act_counts[p0:p1], n, fractions, alpha).items():
            parts[key].append(v)
    floors = _random_screening(act_counts, n, fractions, alpha)
    out: dict[str, float] = {}
    for key, chunks in parts.items():
        v = torch.cat(chunks)
        out[key] = float(v.nanmean())
        out[f"{key}_median"] = float(v.nanquantile(0.5)) if v.numel() else float("nan")
    for key, v in floors.items():
        out[f"random_{key}"] = float(v.nanmean())
    out["n_pockets"] = float(n_pockets)
    out["n_ligands"] = float(n)
    return out
