"""Virtual-screening metrics (EF, BEDROC, AUROC) against formulas written out here in plain Python/numpy.

The reference ranks by explicit sorting with the pessimistic tie rule (an active goes after every inactive
of equal score; NaN is the lowest score), counts AUROC over (active, inactive) pairs, and takes BEDROC from
Truchon & Bayly's closed form (J. Chem. Inf. Model. 47, 488 (2007), eq. 36), not from the RIEmin/RIEmax
rescaling the implementation uses, so the two agree only if both are right.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ablate.metrics import compute_screening_metrics, random_screening, screening

FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
METRIC_KEYS = ("ef0.5", "ef1", "ef2", "ef5", "bedroc", "auroc")

# --------------------------------------------------------------------------------------
# Reference formulas
# --------------------------------------------------------------------------------------


def _clean(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def brute_positions(scores: list[float], actives: list[bool]) -> list[int]:
    """1-based positions of the actives: sort by score descending, inactives first among equal scores."""
    s = [_clean(x) for x in scores]
    order = sorted(range(len(s)), key=lambda j: (-s[j], actives[j]))
    return [pos + 1 for pos, j in enumerate(order) if actives[j]]


def truchon_bedroc(positions: list[int], n: int, alpha: float) -> float:
    """BEDROC from Truchon & Bayly (2007), eq. 36, with RIE from eq. 18."""
    a = len(positions)
    ra = a / n
    random_mean = a / n * (1 - math.exp(-alpha)) / (math.exp(alpha / n) - 1)
    rie = sum(math.exp(-alpha * r / n) for r in positions) / random_mean
    return rie * ra * math.sinh(alpha / 2) / (math.cosh(alpha / 2) - math.cosh(alpha / 2 - alpha * ra)) + 1 / (
        1 - math.exp(alpha * (1 - ra))
    )


def brute_screening(scores: list[float], actives: list[bool], fractions: tuple[float, ...], alpha: float) -> dict:
    n, a = len(scores), sum(actives)
    keys = [f"ef{100 * x:g}" for x in fractions] + ["bedroc", "auroc"]
    if a in (0, n):
        return dict.fromkeys(keys, math.nan)
    pos = brute_positions(scores, actives)
    out = {}
    for x in fractions:
        m = max(1, math.ceil(n * x))
        out[f"ef{100 * x:g}"] = (sum(p <= m for p in pos) / m) / (a / n)
    out["bedroc"] = truchon_bedroc(pos, n, alpha)
    s = [_clean(v) for v in scores]
    act = [s[j] for j in range(n) if actives[j]]
    ina = [s[j] for j in range(n) if not actives[j]]
    out["auroc"] = sum(x > y for x in act for y in ina) / (len(act) * len(ina))  # a tie is a lost pair
    return out


def assert_same(got: dict, want: dict, tol: float = 1e-9) -> None:
    assert set(want) <= set(got)
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=tol, abs=tol), key


def random_case(rng: np.random.Generator, n: int, n_actives: int) -> tuple[list[float], list[bool]]:
    """Integer scores from a small range (many ties), actives shifted up a little, a few NaN."""
    actives = np.zeros(n, dtype=bool)
    actives[rng.choice(n, n_actives, replace=False)] = True
    scores = rng.integers(0, 12, n).astype(float) + 3.0 * actives * rng.integers(0, 2, n)
    scores[rng.choice(n, 3, replace=False)] = np.nan
    return scores.tolist(), actives.tolist()


# --------------------------------------------------------------------------------------
# screening(): one query
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "n", "n_actives"), [(0, 37, 1), (1, 150, 6), (2, 401, 25), (3, 64, 63)])
def test_screening_matches_brute_force_with_ties(seed: int, n: int, n_actives: int) -> None:
    rng = np.random.default_rng(seed)
    scores, actives = random_case(rng, n, n_actives)
    for alpha in (80.5, 4.0):
        want = brute_screening(scores, actives, FRACTIONS, alpha)
        for dtype in (torch.float64, torch.float32):  # integer scores are exact in both
            got = screening(torch.tensor(scores, dtype=dtype), torch.tensor(actives), FRACTIONS, alpha)
            assert list(got) == [f"ef{100 * x:g}" for x in FRACTIONS] + ["bedroc", "auroc"]
            assert_same(got, want)


def test_default_keys_and_edge_cases() -> None:
    s = torch.arange(10.0)
    assert list(screening(s, s > 7)) == list(METRIC_KEYS)
    for actives in (torch.zeros(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool)):
        assert all(math.isnan(v) for v in screening(s, actives).values())
    assert all(math.isnan(v) for v in random_screening(0, 10).values())
    assert all(math.isnan(v) for v in random_screening(10, 10).values())
    perfect = screening(s, s > 7)  # the two actives score highest: ranks 1 and 2
    assert perfect["auroc"] == 1.0 and perfect["bedroc"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["ef1"] == pytest.approx(1 * 10 / (1 * 2))  # top ceil(0.1) = 1 molecule, an active
    with pytest.raises(ValueError, match="fractions"):
        screening(s, s > 7, fractions=(0.0,))
    with pytest.raises(ValueError, match="one length"):
        screening(s, torch.ones(9, dtype=torch.bool))


def test_nan_scores_count_as_lowest() -> None:
    s = torch.tensor([0.3, float("nan"), -5.0, 0.1, float("-inf")])
    active = torch.tensor([False, True, False, False, False])
    got = screening(s, active, fractions=(0.2, 0.6, 1.0))
    assert got["auroc"] == 0.0  # NaN ranks below -inf's inactive too (a tie with -inf: the active loses)
    assert got["ef20"] == 0.0 and got["ef60"] == 0.0 and got["ef100"] == 1.0


def test_screening_matches_rdkit_without_ties() -> None:
    pytest.importorskip("rdkit", reason="rdkit is an optional extra: pip install 'ablate[rdkit]'")
    from rdkit.ML.Scoring import Scoring

    fractions = [0.005, 0.01, 0.02, 0.05, 0.1]
    rng = np.random.default_rng(7)
    for n, n_actives in ((200, 1), (200, 9), (1234, 40), (501, 250)):
        cuts = [math.ceil(n * f) for f in fractions]
        assert len(set(cuts)) == len(cuts)  # RDKit's loop takes one cut per molecule: distinct cuts only
        actives = np.zeros(n, dtype=bool)
        actives[rng.choice(n, n_actives, replace=False)] = True
        scores = rng.normal(size=n) + 1.5 * actives  # continuous: no ties
        order = np.argsort(-scores)
        table = [[float(scores[j]), bool(actives[j])] for j in order]  # RDKit wants best first
        got = screening(torch.tensor(scores), torch.tensor(actives), fractions)
        ef = Scoring.CalcEnrichment(table, 1, fractions)
        assert [got[f"ef{100 * f:g}"] for f in fractions] == pytest.approx(ef, rel=1e-9, abs=1e-9)
        assert got["bedroc"] == pytest.approx(Scoring.CalcBEDROC(table, 1, 80.5), rel=1e-9, abs=1e-12)
        assert got["auroc"] == pytest.approx(Scoring.CalcAUC(table, 1), rel=1e-9, abs=1e-12)


def test_constant_scores_rank_actives_last() -> None:
    n, a = 200, 8
    actives = torch.zeros(n, dtype=torch.bool)
    actives[::25] = True
    got = screening(torch.zeros(n), actives)
    floor = random_screening(a, n)
    # every active behind every inactive: positions n - a + 1 .. n
    assert got["auroc"] == 0.0
    assert all(got[f"ef{100 * x:g}"] == 0.0 for x in (0.005, 0.01, 0.02, 0.05))
    assert got["bedroc"] == pytest.approx(truchon_bedroc(list(range(n - a + 1, n + 1)), n, 80.5), abs=1e-12)
    assert got["bedroc"] <= floor["bedroc"] and abs(got["bedroc"]) < 1e-12
    # a cut that reaches into the actives still enriches no better than random
    all_in = screening(torch.zeros(n), actives, fractions=(0.99,))
    assert all_in["ef99"] == pytest.approx((6 / 198) / (a / n)) and all_in["ef99"] <= 1.0


# --------------------------------------------------------------------------------------
# random_screening(): the expectation under a uniformly random ranking
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "n_actives", "alpha"), [(6, 2, 3.0), (5, 1, 80.5), (5, 2, 80.5)])
def test_random_screening_equals_the_mean_over_all_permutations(n: int, n_actives: int, alpha: float) -> None:
    fractions = (0.2, 0.34, 0.5, 1.0)
    actives = torch.arange(n) < n_actives
    totals: dict[str, float] = {}
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        got = screening(torch.tensor(perm, dtype=torch.float64), actives, fractions, alpha)
        for key, value in got.items():
            totals[key] = totals.get(key, 0.0) + value / len(perms)
    assert_same(random_screening(n_actives, n, fractions, alpha), totals, tol=1e-12)
    # and the floor is what the closed form says: E[BEDROC] from the mean of exp(-alpha r / n)
    mean_rie_term = sum(math.exp(-alpha * r / n) for r in range(1, n + 1)) / n
    ra = n_actives / n
    expected_rie = n_actives * mean_rie_term / (ra * (1 - math.exp(-alpha)) / (math.exp(alpha / n) - 1))
    assert expected_rie == pytest.approx(1.0, rel=1e-12)


def test_random_screening_matches_monte_carlo() -> None:
    n, n_actives, trials = 100, 5, 1000
    rng = np.random.default_rng(11)
    actives = torch.arange(n) < n_actives
    draws: dict[str, list[float]] = {}
    for _ in range(trials):
        got = screening(torch.tensor(rng.permutation(n), dtype=torch.float64), actives)
        for key, value in got.items():
            draws.setdefault(key, []).append(value)
    floor = random_screening(n_actives, n)
    for key, values in draws.items():
        v = np.array(values)
        se = v.std(ddof=1) / math.sqrt(trials)
        # the seed is fixed, so this is deterministic; 5 standard errors is a miss with probability ~6e-7
        assert abs(v.mean() - floor[key]) < 5 * se, (key, v.mean(), floor[key], se)
    assert floor["auroc"] == 0.5 and all(floor[f"ef{x}"] == 1.0 for x in ("0.5", "1", "2", "5"))


# --------------------------------------------------------------------------------------
# compute_screening_metrics(): every pocket screens the library
# --------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_compute(
    p: np.ndarray, lig: np.ndarray, pocket_ids: list[int] | None, ligand_ids: list[int] | None,
    fractions: tuple[float, ...], alpha: float,
) -> dict[str, float]:
    """One loop iteration per pocket: max cosine over its rows, actives = ligands of its rows."""
    rows = len(p)
    pids = list(range(rows)) if pocket_ids is None else pocket_ids
    lids = list(range(rows)) if ligand_ids is None else ligand_ids
    first: dict[int, int] = {}
    for row, i in enumerate(lids):
        first.setdefault(i, row)
    library = sorted(first)
    g = _unit(lig[[first[i] for i in library]])
    with np.errstate(invalid="ignore"):
        q = _unit(p)
    per_pocket: dict[str, list[float]] = {}
    floors: dict[str, list[float]] = {}
    for pocket in sorted(set(pids)):
        mine = [r for r in range(rows) if pids[r] == pocket]
        sims = np.nan_to_num(q[mine] @ g.T, nan=-np.inf)
        scores = sims.max(axis=0).tolist()
        active_ids = {lids[r] for r in mine}
        actives = [i in active_ids for i in library]
        for key, value in brute_screening(scores, actives, fractions, alpha).items():
            per_pocket.setdefault(key, []).append(value)
        for key, value in random_screening(len(active_ids), len(library), fractions, alpha).items():
            floors.setdefault(key, []).append(value)
    out: dict[str, float] = {}
    for key, values in per_pocket.items():
        out[key] = float(np.nanmean(values))
        out[f"{key}_median"] = float(np.nanmedian(values))
    for key, values in floors.items():
        out[f"random_{key}"] = float(np.nanmean(values))
    out["n_pockets"] = float(len(set(pids)))
    out["n_ligands"] = float(len(library))
    return out


def paired_case(seed: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Pockets with one to four rows (repeated embeddings and distinct conformations), shared ligands."""
    rng = np.random.default_rng(seed)
    n_pockets, dim = 15, 6
    centres = rng.normal(size=(n_pockets, dim))
    ligand_vecs = rng.normal(size=(60, dim))
    p, lig, pids, lids = [], [], [], []
    for pocket in range(n_pockets):
        conformations = [centres[pocket] + 0.3 * rng.normal(size=dim) for _ in range(rng.integers(1, 3))]
        for _ in range(rng.integers(1, 5)):
            lid = int(rng.integers(0, 60))
            ligand_vecs[lid] = 0.5 * ligand_vecs[lid] + centres[pocket]  # make the pocket's actives score well
            p.append(conformations[int(rng.integers(0, len(conformations)))])
            lig.append(ligand_vecs[lid] + 0.01 * rng.normal(size=dim))  # a repeated id's later rows differ
            pids.append(100 + 3 * pocket)
            lids.append(lid)
    for lid in range(60):  # the rest of the library: ligands paired with a pocket of their own
        if lid not in lids:
            p.append(rng.normal(size=dim))
            lig.append(ligand_vecs[lid])
            pids.append(-1 - lid)
            lids.append(lid)
    return np.array(p), np.array(lig), pids, lids


FR = (0.01, 0.05, 0.1, 0.2)


@pytest.mark.parametrize("seed", [0, 1])
def test_compute_screening_metrics_matches_per_pocket_loop(seed: int) -> None:
    p, lig, pids, lids = paired_case(seed)
    p[3] = np.nan  # a NaN row: its scores are the lowest, so the max over the pocket's rows ignores it
    want = brute_compute(p, lig, pids, lids, FR, 80.5)
    t = torch.tensor
    got = compute_screening_metrics(t(p), t(lig), t(pids), t(lids), fractions=FR)
    assert_same(got, want)
    assert got["n_ligands"] == 60.0 and got["n_pockets"] == len(set(pids))
    for chunk in (1, 299):  # 1: one pocket and one row per step; 299: four pockets (or rows) per step
        assert got == compute_screening_metrics(t(p), t(lig), t(pids), t(lids), fractions=FR, chunk_elements=chunk)


def test_compute_without_ids_and_with_ties_matches_per_pocket_loop() -> None:
    rng = np.random.default_rng(5)
    eye = np.eye(4)
    p = eye[rng.integers(0, 4, 40)]  # one-hot: every cosine is exactly 0 or 1, so ties everywhere
    lig = eye[rng.integers(0, 4, 40)]
    t = torch.tensor
    for lids in (None, [int(i) for i in rng.integers(0, 25, 40)]):
        want = brute_compute(p, lig, None, lids, FR, 80.5)
        got = compute_screening_metrics(t(p), t(lig), ligand_ids=None if lids is None else t(lids), fractions=FR)
        assert_same(got, want)
        assert got == compute_screening_metrics(
            t(p), t(lig), ligand_ids=None if lids is None else t(lids), fractions=FR, chunk_elements=1
        )


def test_pocket_rows_take_the_max_and_union_their_actives() -> None:
    e = torch.eye(3, dtype=torch.float64)
    # pocket 7 has conformations e0 (paired with ligand 0) and e1 (paired with ligand 1); decoys: 2 and 3
    p = torch.stack([e[0], e[1], e[2], e[2]])
    lig = torch.stack([e[0], e[1], (e[0] + e[1] + e[2]), e[2]])
    pids = torch.tensor([7, 7, 8, 9])
    got = compute_screening_metrics(p, lig, pids, fractions=(0.25, 0.5))
    # pocket 7: scores max(e0, e1) . ligand = 1, 1, 0.577, 0 -> actives {0, 1} at positions 1, 2
    # pockets 8 and 9 (e2): scores 0, 0, 0.577, 1 -> pocket 8's active (ligand 2) at 2, pocket 9's (3) at 1
    assert got["n_pockets"] == 3.0 and got["n_ligands"] == 4.0
    aurocs = [1.0, 2 / 3, 1.0]
    ef25 = [(1 / 1) / (2 / 4), (0 / 1) / (1 / 4), (1 / 1) / (1 / 4)]  # top 1
    ef50 = [(2 / 2) / (2 / 4), (1 / 2) / (1 / 4), (1 / 2) / (1 / 4)]  # top 2
    assert got["auroc"] == pytest.approx(np.mean(aurocs)) and got["auroc_median"] == pytest.approx(1.0)
    assert got["ef25"] == pytest.approx(np.mean(ef25)) and got["ef25_median"] == pytest.approx(2.0)
    assert got["ef50"] == pytest.approx(np.mean(ef50)) and got["ef50_median"] == pytest.approx(2.0)
    # (pocket 7's AUROC of 1 needs the max: the mean over its rows would put ligand 2 (0.577) above both
    # actives (0.5), and its first row alone would tie ligand 1 with ligand 3 at 0)
    floors = [random_screening(a, 4)["bedroc"] for a in (2, 1, 1)]
    assert got["random_bedroc"] == pytest.approx(np.mean(floors))
    assert got["random_ef50"] == 1.0 and got["random_auroc"] == 0.5


def test_repeated_rows_and_ligand_ids_change_nothing() -> None:
    p, lig, pids, lids = paired_case(3)
    t = torch.tensor
    base = compute_screening_metrics(t(p), t(lig), t(pids), t(lids), fractions=FR)
    # the same pairs again, and a row of a known ligand id with a different embedding (not its first row)
    extra = [0, 1, 2]
    p2 = np.concatenate([p, p[extra], p[:1]])
    lig2 = np.concatenate([lig, lig[extra], 5.0 * np.ones((1, lig.shape[1]))])
    pids2, lids2 = pids + [pids[i] for i in extra] + [pids[0]], lids + [lids[i] for i in extra] + [lids[0]]
    again = compute_screening_metrics(t(p2), t(lig2), t(pids2), t(lids2), fractions=FR)
    assert again == base


def test_collapsed_model_scores_at_random_or_below() -> None:
    rng = np.random.default_rng(2)
    lig = torch.tensor(rng.normal(size=(300, 16)))
    collapsed = torch.ones(300, 16, dtype=torch.float64)  # every pocket the same vector
    got = compute_screening_metrics(collapsed, lig)
    # one fixed ranking shared by all pockets, whose actives cover each ligand once: exactly random on average
    for key in ("ef0.5", "ef1", "ef2", "ef5"):
        assert got[key] <= 1.0 + 1e-12 and got[f"random_{key}"] == 1.0
    assert got["auroc"] <= 0.5 + 1e-12
    assert got["bedroc"] <= got["random_bedroc"] + 1e-12
    assert got["bedroc"] == pytest.approx(got["random_bedroc"], rel=1e-9)
    # everything identical: every score ties and every active goes last
    flat = compute_screening_metrics(collapsed, torch.ones(300, 16, dtype=torch.float64) + 0 * lig)
    assert flat["n_ligands"] == 300.0 and flat["auroc"] == 0.0 and flat["ef5"] == 0.0
    assert abs(flat["bedroc"]) < 1e-12


def test_compute_screening_metrics_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="rows"):
        compute_screening_metrics(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="pocket_ids"):
        compute_screening_metrics(torch.ones(3, 2), torch.ones(3, 2), pocket_ids=torch.arange(2))


def test_pocket_whose_actives_are_the_whole_library_is_left_out() -> None:
    e = torch.eye(3, dtype=torch.float64)
    # pocket 0 is paired with all three ligands (no inactive: NaN metrics); pocket 1 with ligand 2 only
    p = torch.stack([e[0], e[0], e[0], e[1]])
    lig = torch.stack([e[0], e[1], e[2], e[2]])
    got = compute_screening_metrics(p, lig, torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 2]))
    # pocket 1 (e1) scores ligands 0, 1, 2 as 0, 1, 0: its active (2) ties with ligand 0 and goes behind it
    alone = screening(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([False, False, True]))
    assert got["n_pockets"] == 2.0 and got["n_ligands"] == 3.0
    assert alone["auroc"] == 0.0
    assert_same({k: got[k] for k in METRIC_KEYS}, alone, tol=1e-12)
    assert_same({k: got[f"{k}_median"] for k in METRIC_KEYS}, alone, tol=1e-12)
    assert_same({k: got[f"random_{k}"] for k in METRIC_KEYS}, random_screening(1, 3), tol=1e-12)
