"""Losses against independent float64 formulas written out in the test (numpy, explicit loops)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ablate.errors import AblateError
from ablate.losses import (
    CombinedLoss,
    CosineSimilarityLoss,
    InfoNCELoss,
    MSELoss,
    MultiStageScheduler,
    SupervisedContrastiveLoss,
    build_loss,
)

# --------------------------------------------------------------------------------------
# Reference formulas (numpy float64)
# --------------------------------------------------------------------------------------


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _logsumexp(v: list[float]) -> float:
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))


def _ce_rows(s: np.ndarray, ids: list[int] | None) -> float:
    """Mean over rows i of -log softmax(s[i])[i], the softmax over j == i or ids[j] != ids[i]."""
    b = s.shape[0]
    total = 0.0
    for i in range(b):
        allowed = [s[i, j] for j in range(b) if j == i or ids is None or ids[j] != ids[i]]
        total += _logsumexp(allowed) - s[i, i]
    return total / b


def ref_infonce(p: torch.Tensor, t: torch.Tensor, temperature: float, symmetric: bool, ids=None) -> float:
    s = _unit(_np(p)) @ _unit(_np(t)).T / temperature
    forward = _ce_rows(s, ids)
    if not symmetric:
        return forward
    return 0.5 * (forward + _ce_rows(s.T, ids))


def ref_cosine(p: torch.Tensor, t: torch.Tensor) -> float:
    return float(np.mean(1.0 - np.sum(_unit(_np(p)) * _unit(_np(t)), axis=1)))


def ref_mse(p: torch.Tensor, t: torch.Tensor) -> float:
    return float(np.mean((_np(p) - _np(t)) ** 2))


def ref_supcon(p, t, temperature, ids=None, similarity=None, threshold=None) -> float:
    """Khosla et al. L_out with pocket anchors and ligand candidates, one anchor at a time."""
    pu, tu = _unit(_np(p)), _unit(_np(t))
    b = pu.shape[0]
    sim_np = None if similarity is None else similarity.double().numpy()
    total = 0.0
    for i in range(b):
        logits, weights = [], []
        for j in range(b):
            if sim_np is not None:
                same = i == j
                weight = 1.0 if same else min(max(sim_np[i, j], 0.0), 1.0)
                sim_ij = sim_np[i, j]
            else:
                same = (i == j) if ids is None else ids[i] == ids[j]
                weight = 1.0 if same else 0.0
                sim_ij = min(max(float(tu[i] @ tu[j]), 0.0), 1.0)
            if threshold is not None and sim_ij > threshold and not same:
                continue  # ignored: neither negative nor positive
            logits.append(float(pu[i] @ tu[j]) / temperature)
            weights.append(weight)
        lse = _logsumexp(logits)
        num = sum(w * (z - lse) for w, z in zip(weights, logits, strict=True))
        total += -num / sum(weights)
    return total / b


def _batch(b: int = 8, d: int = 6, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, d, generator=g, dtype=torch.float64)
    p = t + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)
    return p.to(dtype), t.to(dtype)


def _shared_batch(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch where rows 1 and 4 share a ligand, and rows 2, 5 and 6 share another."""
    p, t = _batch(8, 6, seed=3, dtype=dtype)
    ids = torch.tensor([0, 1, 2, 3, 1, 2, 2, 4])
    t = t.clone()
    t[4] = t[1]
    t[5] = t[2]
    t[6] = t[2]
    return p, t, ids


# --------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("temperature", [0.07, 1.0])
@pytest.mark.parametrize("b", [2, 7, 32])
def test_infonce_equals_ln_b_at_equal_similarities(symmetric: bool, temperature: float, b: int) -> None:
    row_p = torch.randn(1, 5, generator=torch.Generator().manual_seed(b))
    row_t = torch.randn(1, 5, generator=torch.Generator().manual_seed(b + 100))
    loss = InfoNCELoss(temperature, symmetric=symmetric)(row_p.expand(b, 5), row_t.expand(b, 5))
    assert loss.item() == pytest.approx(math.log(b), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_infonce_symmetric_is_mean_of_both_directions(temperature: float) -> None:
    p, t = _batch(9, 5, seed=1)
    loss = InfoNCELoss(temperature, symmetric=True)(p, t).item()
    assert loss == pytest.approx(ref_infonce(p, t, temperature, symmetric=True), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_infonce_one_directional_is_pocket_to_ligand(temperature: float) -> None:
    p, t = _batch(9, 5, seed=2)
    loss = InfoNCELoss(temperature, symmetric=False)(p, t).item()
    expected = ref_infonce(p, t, temperature, symmetric=False)
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # and it is not the ligand -> pocket direction (the batch is not symmetric)
    s = _unit(_np(p)) @ _unit(_np(t)).T / temperature
    assert abs(loss - _ce_rows(s.T, None)) > 1e-3


@pytest.mark.parametrize("symmetric", [True, False])
def test_infonce_shared_ligands_are_not_negatives(symmetric: bool) -> None:
    p, t, ids = _shared_batch()
    crit = InfoNCELoss(0.1, symmetric=symmetric)
    masked = crit(p, t, ids).item()
    unmasked = crit(p, t).item()
    expected = ref_infonce(p, t, 0.1, symmetric=symmetric, ids=ids.tolist())
    assert masked == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert unmasked == pytest.approx(ref_infonce(p, t, 0.1, symmetric=symmetric), rel=1e-5, abs=1e-5)
    # dropping terms from the denominators can only lower the loss, and here it does, clearly
    assert masked < unmasked - 1e-2


def test_infonce_all_distinct_ids_equal_unmasked() -> None:
    p, t = _batch(6, 4, seed=4)
    crit = InfoNCELoss(0.2)
    assert crit(p, t, torch.arange(6) * 3).item() == pytest.approx(crit(p, t).item(), rel=1e-6)


def test_infonce_low_temperature_under_bf16_autocast_is_finite_and_fp32() -> None:
    torch.manual_seed(0)
    b, d = 16, 32
    x = torch.randn(b, d)
    target = torch.randn(b, d)
    head = nn.Linear(d, d)
    crit = InfoNCELoss(temperature=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = head(x)
        assert pred.dtype == torch.bfloat16  # the premise: autocast really produced half precision
        loss = crit(pred, target, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11]))
        logits = crit.logits(pred, target)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert torch.isfinite(head.weight.grad).all() and torch.isfinite(head.bias.grad).all()
    assert head.weight.grad.abs().sum() > 0

    # the logits are float32 and carry float32 precision: a bf16 product would be off by ~0.1-0.4
    # at logits of magnitude ~100 (bf16 keeps 8 mantissa bits)
    assert logits.dtype == torch.float32
    expected = _unit(_np(pred)) @ _unit(_np(target)).T / 0.01
    assert np.abs(logits.detach().double().numpy() - expected).max() < 1e-3


@pytest.mark.parametrize(("log_scale", "temperature"), [(50.0, 0.01), (math.log(100.0) + 1e-3, 0.01), (-50.0, 1.0),
                                                         (-1e-3, 1.0), (math.log(20.0), 0.05)])
def test_learnable_temperature_is_clamped(log_scale: float, temperature: float) -> None:
    crit = InfoNCELoss(0.07, learnable=True)
    assert isinstance(crit.log_scale, nn.Parameter)
    with torch.no_grad():
        crit.log_scale.fill_(log_scale)
    assert crit.temperature == pytest.approx(temperature, rel=1e-5)
    assert 1.0 <= 1.0 / crit.temperature <= 100.0 * (1 + 1e-6)
    # the clamped scale is what the loss uses: identical rows give logits of 1 / temperature
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    diag = torch.diagonal(crit.logits(x, x))
    assert torch.allclose(diag, torch.full((3,), 1.0 / temperature), rtol=1e-5)


def test_learnable_temperature_gets_a_gradient_and_fixed_one_does_not() -> None:
    p, t = _batch(6, 4, seed=5)
    learn = InfoNCELoss(0.1, learnable=True)
    learn(p, t).backward()
    assert learn.log_scale.grad is not None and learn.log_scale.grad.abs() > 0
    fixed = InfoNCELoss(0.1)
    assert list(fixed.parameters()) == []
    assert fixed.temperature == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_infonce_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(AblateError, match="temperature"):
        InfoNCELoss(temperature)


# --------------------------------------------------------------------------------------
# Gradients (float64 gradcheck)
# --------------------------------------------------------------------------------------

_SIM = torch.tensor(
    [[0.2, 0.9, 0.1, 0.0, 0.5], [0.9, 1.0, 0.3, 0.2, 0.0], [0.1, 0.3, 0.7, 0.6, 0.4],
     [0.0, 0.2, 0.6, 0.0, 0.95], [0.5, 0.0, 0.4, 0.95, 1.0]], dtype=torch.float64
)
_IDS = torch.tensor([0, 1, 0, 2, 1])

_GRADCHECK_CASES = {
    "infonce_symmetric": lambda a, b: InfoNCELoss(0.5, symmetric=True)(a, b),
    "infonce_one_directional": lambda a, b: InfoNCELoss(0.5, symmetric=False)(a, b),
    "infonce_masked": lambda a, b: InfoNCELoss(0.5)(a, b, _IDS),
    "cosine": lambda a, b: CosineSimilarityLoss()(a, b),
    "combined": lambda a, b: CombinedLoss(0.5, 0.3, 0.2, temperature=0.5)(a, b, _IDS),
    "supcon_ids": lambda a, b: SupervisedContrastiveLoss(0.5)(a, b, _IDS),
    "supcon_soft": lambda a, b: SupervisedContrastiveLoss(0.5)(a, b, similarity=_SIM),
    "supcon_threshold": lambda a, b: SupervisedContrastiveLoss(0.5, threshold=0.8)(a, b, similarity=_SIM),
}


@pytest.mark.parametrize("case", sorted(_GRADCHECK_CASES))
def test_gradcheck_float64(case: str) -> None:
    g = torch.Generator().manual_seed(7)
    p = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GRADCHECK_CASES[case], (p, t))


# --------------------------------------------------------------------------------------
# Cosine, MSE, combined
# --------------------------------------------------------------------------------------


def test_cosine_loss_is_mean_one_minus_cos() -> None:
    p, t = _batch(10, 7, seed=8)
    assert CosineSimilarityLoss()(p, t).item() == pytest.approx(ref_cosine(p, t), rel=1e-5, abs=1e-6)
    # norms do not matter, directions do
    assert CosineSimilarityLoss()(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert CosineSimilarityLoss()(-t, t).item() == pytest.approx(2.0, abs=1e-6)


def test_mse_loss_is_mean_squared_error() -> None:
    p, t = _batch(10, 7, seed=9)
    assert MSELoss()(p, t).item() == pytest.approx(ref_mse(p, t), rel=1e-5)


@pytest.mark.parametrize("use_ids", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_combined_is_weighted_sum_of_independent_parts(use_ids: bool, symmetric: bool) -> None:
    p, t, ids = _shared_batch()
    alpha, beta, gamma, temperature = 0.7, 0.25, 0.05, 0.2
    crit = CombinedLoss(alpha, beta, gamma, temperature, symmetric=symmetric)
    loss = crit(p, t, ids if use_ids else None).item()
    parts = {
        "infonce": ref_infonce(p, t, temperature, symmetric, ids.tolist() if use_ids else None),
        "cosine": ref_cosine(p, t),
        "mse": ref_mse(p, t),
    }
    assert loss == pytest.approx(alpha * parts["infonce"] + beta * parts["cosine"] + gamma * parts["mse"],
                                 rel=1e-5)
    assert set(crit.last_components) == set(parts)
    for name, value in parts.items():
        assert crit.last_components[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
        assert not crit.last_components[name].requires_grad


@pytest.mark.parametrize("weights", [(-0.1, 0.5, 0.5), (0.0, 0.0, 0.0)])
def test_combined_rejects_bad_weights(weights: tuple[float, float, float]) -> None:
    with pytest.raises(AblateError, match="weights"):
        CombinedLoss(*weights)


# --------------------------------------------------------------------------------------
# Supervised contrastive (Khosla et al. 2020, L_out)
# --------------------------------------------------------------------------------------


def test_supcon_with_ligand_ids_as_positives() -> None:
    p, _, ids = _shared_batch()
    _, t = _batch(8, 6, seed=14)  # positives come from the ids, whatever the vectors
    loss = SupervisedContrastiveLoss(0.15)(p, t, ids).item()
    assert loss == pytest.approx(ref_supcon(p, t, 0.15, ids=ids.tolist()), rel=1e-5)
    # the extra positives change the value: it is not the diagonal-only loss any more
    assert abs(loss - ref_supcon(p, t, 0.15)) > 1e-2


def test_supcon_with_identical_ligand_rows_equals_unmasked_infonce() -> None:
    # rows of one ligand hold the same vector, so all its positives share one logit and the mean
    # over positives of log softmax is the diagonal's: L_out reduces to one-directional InfoNCE
    p, t, ids = _shared_batch()
    loss = SupervisedContrastiveLoss(0.15)(p, t, ids).item()
    assert loss == pytest.approx(ref_supcon(p, t, 0.15, ids=ids.tolist()), rel=1e-5)
    assert loss == pytest.approx(ref_infonce(p, t, 0.15, symmetric=False), rel=1e-5)


def test_supcon_without_labels_is_one_directional_infonce() -> None:
    p, t = _batch(7, 5, seed=10)
    loss = SupervisedContrastiveLoss(0.2)(p, t).item()
    assert loss == pytest.approx(ref_infonce(p, t, 0.2, symmetric=False), rel=1e-5)


def test_supcon_with_soft_similarity_weights() -> None:
    p, t = _batch(5, 4, seed=11)
    sim = _SIM.float()
    loss = SupervisedContrastiveLoss(0.2)(p, t, similarity=sim).item()
    expected = ref_supcon(p, t, 0.2, similarity=sim)
    assert loss == pytest.approx(expected, rel=1e-5)
    # the diagonal counts as 1 whatever the matrix says there
    sim_diag_one = sim.clone()
    sim_diag_one.fill_diagonal_(1.0)
    assert SupervisedContrastiveLoss(0.2)(p, t, similarity=sim_diag_one).item() == pytest.approx(loss, rel=1e-6)


def test_supcon_threshold_ignores_near_duplicate_ligands() -> None:
    p, t, ids = _shared_batch()
    t = t.clone()
    g = torch.Generator().manual_seed(12)
    t[3] = t[0] + 0.05 * torch.randn(t.shape[1], generator=g)  # a near duplicate of ligand 0, another id
    t[7] = t[1] + 0.05 * torch.randn(t.shape[1], generator=g)
    tu = _unit(_np(t))
    assert tu[3] @ tu[0] > 0.9 and tu[7] @ tu[1] > 0.9  # the premise: above the threshold
    crit = SupervisedContrastiveLoss(0.15, threshold=0.9)
    loss = crit(p, t, ids).item()
    assert loss == pytest.approx(ref_supcon(p, t, 0.15, ids=ids.tolist(), threshold=0.9), rel=1e-5)
    assert abs(loss - ref_supcon(p, t, 0.15, ids=ids.tolist())) > 1e-3


def test_supcon_threshold_with_soft_similarity() -> None:
    p, t = _batch(5, 4, seed=13)
    sim = _SIM.float()
    loss = SupervisedContrastiveLoss(0.2, threshold=0.8)(p, t, similarity=sim).item()
    assert loss == pytest.approx(ref_supcon(p, t, 0.2, similarity=sim, threshold=0.8), rel=1e-5)
    assert abs(loss - ref_supcon(p, t, 0.2, similarity=sim)) > 1e-3


@pytest.mark.parametrize(("kwargs", "word"), [({"temperature": 0.0}, "temperature"), ({"threshold": 0.0}, "threshold"),
                                              ({"threshold": 1.5}, "threshold")])
def test_supcon_rejects_bad_parameters(kwargs: dict[str, float], word: str) -> None:
    with pytest.raises(AblateError, match=word):
        SupervisedContrastiveLoss(**kwargs)


# --------------------------------------------------------------------------------------
# Multi-stage schedule
# --------------------------------------------------------------------------------------


def test_multistage_stage_boundaries_and_lrs() -> None:
    sched = MultiStageScheduler(3, 4, lrs=(1e-2, 5e-3, 1e-4))
    expected = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1, 7: 2, 8: 2, 100: 2}
    kinds = (MSELoss, InfoNCELoss, CombinedLoss)
    names = ("mse_warmup", "contrastive", "finetune")
    lrs = (1e-2, 5e-3, 1e-4)
    for epoch, stage in expected.items():
        crit, name = sched.get_loss(epoch)
        assert type(crit) is kinds[stage], epoch
        assert name == names[stage], epoch
        assert sched.get_recommended_lr() == lrs[stage], epoch
        assert sched.stage_of(epoch) == stage


def test_multistage_default_boundaries() -> None:
    sched = MultiStageScheduler()
    assert sched.stage3_start == 150
    assert [sched.stage_of(e) for e in (0, 49, 50, 149, 150)] == [0, 0, 1, 1, 2]
    sched.get_loss(0)
    assert sched.get_recommended_lr() == 1e-3
    sched.get_loss(50)
    assert sched.get_recommended_lr() == 5e-4
    sched.get_loss(150)
    assert sched.get_recommended_lr() == 1e-4


def test_multistage_explicit_stage3_start() -> None:
    sched = MultiStageScheduler(2, 10, stage3_start=5)
    assert [sched.stage_of(e) for e in range(7)] == [0, 0, 1, 1, 1, 2, 2]
    assert MultiStageScheduler(0, 0).stage_of(0) == 2  # no warm-up, no contrastive stage


def test_multistage_stages_share_one_temperature() -> None:
    sched = MultiStageScheduler(1, 1, temperature=0.2, learnable=True, alpha=0.6, beta=0.3, gamma=0.1)
    infonce, _ = sched.get_loss(1)
    combined, _ = sched.get_loss(2)
    assert isinstance(combined, CombinedLoss) and isinstance(infonce, InfoNCELoss)
    assert combined.infonce is infonce
    assert (combined.alpha, combined.beta, combined.gamma) == (0.6, 0.3, 0.1)
    with torch.no_grad():
        infonce.log_scale.fill_(math.log(40.0))
    assert combined.infonce.temperature == pytest.approx(1 / 40.0, rel=1e-5)


def test_multistage_rejects_inverted_boundaries() -> None:
    with pytest.raises(AblateError, match="stage"):
        MultiStageScheduler(10, 5, stage3_start=4)


# --------------------------------------------------------------------------------------
# build_loss and the self-check
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [("mse", MSELoss), ("cosine", CosineSimilarityLoss), ("infonce", InfoNCELoss), ("combined", CombinedLoss),
     ("supcon", SupervisedContrastiveLoss), ("multistage", MultiStageScheduler)],
)
def test_build_loss_every_name(name: str, kind: type) -> None:
    assert type(build_loss(name)) is kind


def test_build_loss_passes_parameters() -> None:
    infonce = build_loss("infonce", temperature=0.2, symmetric=False)
    assert isinstance(infonce, InfoNCELoss)
    assert infonce.temperature == pytest.approx(0.2, rel=1e-6) and infonce.symmetric is False
    combined = build_loss("combined", alpha=0.1, beta=0.2, gamma=0.7)
    assert isinstance(combined, CombinedLoss)
    assert (combined.alpha, combined.beta, combined.gamma) == (0.1, 0.2, 0.7)
    sched = build_loss("multistage", stage1_epochs=2, stage2_epochs=3)
    assert isinstance(sched, MultiStageScheduler) and sched.stage3_start == 5


def test_build_loss_unknown_name_lists_choices() -> None:
    with pytest.raises(AblateError) as err:
        build_loss("triplet")
    message = str(err.value)
    assert "triplet" in message
    for name in ("mse", "cosine", "infonce", "combined", "supcon", "multistage"):
        assert name in message


def test_build_loss_unknown_parameter_is_a_user_error() -> None:
    with pytest.raises(AblateError, match=r"infonce.*temprature"):
        build_loss("infonce", temprature=0.1)


def test_module_self_check_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "ablate.losses"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"InfoNCE at equal similarities: ([0-9.]+) \(ln B = ([0-9.]+)\) OK", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) == pytest.approx(math.log(32), abs=1e-4)
    assert float(match.group(2)) == pytest.approx(math.log(32), abs=1e-4)
