"""Retrieval metrics against a brute-force numpy implementation written out in the test."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from ablate.metrics import alignment, compute_retrieval_metrics, uniformity

# --------------------------------------------------------------------------------------
# Brute force (numpy float64, the whole similarity matrix)
# --------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_ranks(queries: np.ndarray, gallery: np.ndarray, q_labels: list[int], g_labels: list[int]) -> np.ndarray:
    """rank = 1 + number of wrong gallery items scoring >= the best correct one (pessimistic ties)."""
    s = _unit(queries) @ _unit(gallery).T
    out = []
    for i in range(s.shape[0]):
        correct = np.array([g == q_labels[i] for g in g_labels])
        best = s[i, correct].max()
        out.append(1 + int(np.sum((s[i] >= best) & ~correct)))
    return np.array(out)


def brute_summary(r: np.ndarray, top_k: tuple[int, ...], prefix: str) -> dict[str, float]:
    out = {f"{prefix}top{k}_accuracy": float(np.mean(r <= k)) for k in top_k}
    out[f"{prefix}mrr"] = float(np.mean(1.0 / r))
    out[f"{prefix}median_rank"] = float(np.median(r))
    return out


def brute_metrics(p: np.ndarray, lig: np.ndarray, top_k: tuple[int, ...], ids: list[int] | None) -> dict[str, float]:
    n = len(p)
    if ids is None:
        labels = list(range(n))
        fwd = brute_ranks(p, lig, labels, labels)
        rev = brute_ranks(lig, p, labels, labels)
    else:
        first: dict[int, int] = {}
        for row, i in enumerate(ids):
            first.setdefault(i, row)
        gallery_ids = list(first)
        gallery = lig[[first[i] for i in gallery_ids]]
        fwd = brute_ranks(p, gallery, ids, gallery_ids)
        rev = brute_ranks(gallery, p, gallery_ids, ids)
    return {**brute_summary(fwd, top_k, ""), **brute_summary(rev, top_k, "reverse_")}


def np_alignment(x: np.ndarray, y: np.ndarray) -> float:
    """Wang & Isola: mean squared distance of positive pairs of unit vectors."""
    ux, uy = _unit(x), _unit(y)
    return float(np.mean([np.sum((a - b) ** 2) for a, b in zip(ux, uy, strict=True)]))


def np_uniformity(x: np.ndarray, t: float = 2.0) -> float:
    """Wang & Isola: log of the mean over distinct pairs of exp(-t ||f(a) - f(b)||^2)."""
    u = _unit(x)
    n = len(u)
    terms = [math.exp(-t * float(np.sum((u[a] - u[b]) ** 2))) for a in range(n) for b in range(n) if a != b]
    return math.log(sum(terms) / len(terms))


def _pairs(n: int, d: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lig = torch.randn(n, d, generator=g)
    p = lig + noise * torch.randn(n, d, generator=g)
    return p, lig


# --------------------------------------------------------------------------------------
# Ranks against brute force
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_brute_force_without_ids(seed: int) -> None:
    p, lig = _pairs(60, 8, seed, noise=1.5)
    top_k = (1, 3, 10)
    got = compute_retrieval_metrics(p, lig, top_k=top_k)
    expected = brute_metrics(p.numpy(), lig.numpy(), top_k, None)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # the data is neither trivial nor hopeless, so the comparison means something
    assert 0.05 < got["top1_accuracy"] < 0.95
    assert got["median_rank"] > 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_brute_force_with_ligand_ids(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    n, d, n_ligands = 70, 8, 25
    ids = torch.cat([torch.arange(n_ligands), torch.randint(0, n_ligands, (n - n_ligands,), generator=g)])
    ids = ids[torch.randperm(n, generator=g)] * 7 + 3  # ids need not be 0..k-1
    base = torch.randn(n_ligands, d, generator=g)
    lig = base[(ids - 3) // 7]  # rows of one ligand hold the same vector
    p = lig + 1.0 * torch.randn(n, d, generator=g)
    top_k = (1, 5)
    got = compute_retrieval_metrics(p, lig, top_k=top_k, ligand_ids=ids)
    expected = brute_metrics(p.numpy(), lig.numpy(), top_k, ids.tolist())
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0.05 < got["top1_accuracy"] < 0.95


def test_ligand_ids_gallery_holds_each_ligand_once() -> None:
    # two pockets of ligand 5 and one of ligand 9: a perfect model ranks every query first,
    # which it could not if ligand 5 sat twice in the gallery (pessimistic ties)
    lig = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    ids = torch.tensor([5, 9, 5])
    got = compute_retrieval_metrics(lig.clone(), lig, top_k=(1,), ligand_ids=ids)
    assert got["top1_accuracy"] == 1.0 and got["reverse_top1_accuracy"] == 1.0
    assert got["mrr"] == 1.0 and got["median_rank"] == 1.0
    # without ids the duplicate rows tie, and ties count against the query
    plain = compute_retrieval_metrics(lig.clone(), lig, top_k=(1,))
    assert plain["top1_accuracy"] == pytest.approx(1 / 3)
    assert plain["median_rank"] == 2.0


# --------------------------------------------------------------------------------------
# Pessimistic ties
# --------------------------------------------------------------------------------------


def test_constant_model_against_constant_targets_scores_worst() -> None:
    n = 50
    const = torch.ones(n, 4)  # unit vector (0.5, 0.5, 0.5, 0.5): every score is exactly 1.0
    got = compute_retrieval_metrics(const, const.clone(), top_k=(1, 5, 10))
    for prefix in ("", "reverse_"):
        assert got[f"{prefix}top1_accuracy"] == 0.0
        assert got[f"{prefix}top10_accuracy"] == 0.0
        assert got[f"{prefix}mrr"] == pytest.approx(1 / n)
        assert got[f"{prefix}median_rank"] == n


def test_constant_model_scores_at_chance_or_worse() -> None:
    n = 50
    _, lig = _pairs(n, 4, seed=5)
    const = torch.ones(n, 4)
    got = compute_retrieval_metrics(const, lig, top_k=(1, 5, 10))
    chance_mrr = sum(1 / r for r in range(1, n + 1)) / n
    assert got["top1_accuracy"] <= 1 / n
    assert got["top5_accuracy"] <= 5 / n
    assert got["mrr"] <= chance_mrr + 1e-12
    # ligands retrieving constant pockets: all scores tie, so every query ranks last
    assert got["reverse_top1_accuracy"] == 0.0
    assert got["reverse_mrr"] == pytest.approx(1 / n)


def test_constant_model_with_ligand_ids_scores_at_chance_or_worse() -> None:
    g = torch.Generator().manual_seed(6)
    n_gallery = 8
    ids = torch.arange(n_gallery).repeat(2)[torch.randperm(2 * n_gallery, generator=g)]  # two pockets each
    lig = torch.randn(n_gallery, 4, generator=g)[ids]
    const = torch.ones(len(ids), 4)
    chance_mrr = sum(1 / r for r in range(1, n_gallery + 1)) / n_gallery
    got = compute_retrieval_metrics(const, lig, top_k=(1,), ligand_ids=ids)
    assert got["top1_accuracy"] <= 1 / n_gallery
    assert got["mrr"] <= chance_mrr + 1e-12
    assert got["reverse_top1_accuracy"] == 0.0
    both = compute_retrieval_metrics(const, const.clone(), top_k=(1,), ligand_ids=ids)
    assert both["top1_accuracy"] == 0.0 and both["reverse_top1_accuracy"] == 0.0
    assert both["mrr"] == pytest.approx(1 / n_gallery)


def test_nan_scores_rank_last() -> None:
    p, lig = _pairs(10, 4, seed=7, noise=0.0)
    p[3] = float("nan")
    got = compute_retrieval_metrics(p, lig, top_k=(1,), reverse=False)
    # nine perfect queries and one with only NaN scores, which ranks behind all nine wrong items
    assert got["top1_accuracy"] == pytest.approx(0.9)
    assert got["mrr"] == pytest.approx((9 + 1 / 10) / 10)


# --------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_ids", [False, True])
def test_tiny_chunks_give_identical_results(with_ids: bool) -> None:
    p, lig = _pairs(45, 6, seed=8)
    ids = torch.arange(45) % 30 if with_ids else None
    if ids is not None:
        lig = lig[ids]
    whole = compute_retrieval_metrics(p, lig, top_k=(1, 5, 10), ligand_ids=ids)
    for chunk in (1, 7, 100):
        chunked = compute_retrieval_metrics(p, lig, top_k=(1, 5, 10), ligand_ids=ids, chunk_elements=chunk)
        assert set(chunked) == set(whole)
        for key, value in whole.items():
            if key == "uniformity":  # float32 products, grouped differently: equal up to rounding
                assert chunked[key] == pytest.approx(value, rel=1e-6)
            else:
                assert chunked[key] == value, (chunk, key)


# --------------------------------------------------------------------------------------
# Embedding quality
# --------------------------------------------------------------------------------------


def test_alignment_and_uniformity_match_wang_isola() -> None:
    p, lig = _pairs(40, 5, seed=9, noise=0.7)
    p_np, lig_np = p.double().numpy(), lig.double().numpy()
    assert alignment(p, lig) == pytest.approx(np_alignment(p_np, lig_np), rel=1e-5)
    assert uniformity(p) == pytest.approx(np_uniformity(p_np), rel=1e-5)
    assert uniformity(p, chunk_elements=3) == pytest.approx(np_uniformity(p_np), rel=1e-5)
    got = compute_retrieval_metrics(p, lig)
    assert got["alignment"] == pytest.approx(np_alignment(p_np, lig_np), rel=1e-5)
    assert got["uniformity"] == pytest.approx(np_uniformity(p_np), rel=1e-5)
    mean_cos = float(np.mean(np.sum(_unit(p_np) * _unit(lig_np), axis=1)))
    assert got["mean_cosine"] == pytest.approx(mean_cos, rel=1e-5)
    u = _unit(p_np)
    assert got["spread"] == pytest.approx(float(np.sqrt(np.mean(np.sum((u - u.mean(0)) ** 2, axis=1)))), rel=1e-5)


def test_alignment_and_uniformity_extremes() -> None:
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(10))
    assert alignment(x, 5.0 * x) == pytest.approx(0.0, abs=1e-10)
    assert alignment(x, -x) == pytest.approx(4.0, rel=1e-6)  # ||u - (-u)||^2 = 4
    assert uniformity(torch.ones(6, 3)) == pytest.approx(0.0, abs=1e-6)  # collapsed: exp(0) everywhere
    # two antipodal points: ||a - b||^2 = 4, so log exp(-8) = -8
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0, rel=1e-6)


# --------------------------------------------------------------------------------------
# Memory: 50,000 x 50,000 without the full matrix
# --------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch
    from ablate.metrics import compute_retrieval_metrics
    torch.manual_seed(0)
    x = torch.randn(50_000, 16)
    m = compute_retrieval_metrics(x, x.clone(), top_k=(1, 10), reverse=False)
    m["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(m))
    """
)


@pytest.mark.slow
@pytest.mark.background([sys.executable, "-c", _MEMORY_SCRIPT])
def test_fifty_thousand_squared_stays_far_below_a_full_matrix(background_result) -> None:
    # one direction only: the reverse pass runs the same chunked code and would add a third to the runtime
    proc = background_result
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    full_matrix_gib = 50_000 * 50_000 * 4 / 2**30  # 9.3 GiB in float32
    peak_gib = m["maxrss_kib"] / 2**20
    assert peak_gib < 3.0 < full_matrix_gib
    # identical pockets and ligands in general position: every query finds itself first
    assert m["top1_accuracy"] == 1.0 and "reverse_top1_accuracy" not in m
    assert m["mrr"] == 1.0 and m["median_rank"] == 1.0
    assert m["alignment"] == pytest.approx(0.0, abs=1e-6)
