"""The one training loop: GradCache equality, determinism, stages, schedules, best epoch, divergence."""

from __future__ import annotations

import math

import pytest
import torch
from support import tiny_run

from ablate.errors import AblateError
from ablate.losses import CombinedLoss, InfoNCELoss, SupervisedContrastiveLoss
from ablate.metrics import compute_retrieval_metrics
from ablate.training.devices import resolve_device
from ablate.training.gradcache import grad_cache
from ablate.training.models import ProjectionHead
from ablate.training.splits import load_split
from ablate.training.trainer import Trainer
from ablate.vocabulary import METRIC_KEYS


def _history(spec):
    split = load_split(spec.data)
    train, val = split.train, split.val
    trainer = Trainer(spec, train, val)
    return trainer, [r for r in trainer.epochs()]


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "criterion",
    [InfoNCELoss(0.1), InfoNCELoss(0.05, symmetric=False), CombinedLoss(), SupervisedContrastiveLoss(0.1)],
    ids=["infonce", "infonce-p2l", "combined", "supcon"],
)
@pytest.mark.parametrize("stream", ["torch", "own"], ids=["global-rng", "own-generator"])
def test_gradcache_gradient_equals_one_large_batch(criterion, stream):
    torch.manual_seed(0)
    x = torch.randn(32, 10, dtype=torch.float64)
    y = torch.randn(32, 6, dtype=torch.float64)
    ids = torch.arange(32)
    ids[5] = ids[4]  # a ligand shared by two pockets: masked out of each other's denominators
    criterion = criterion.double()
    model = ProjectionHead(10, 6, (16,), dropout=0.3).double()
    generator = torch.Generator()
    if stream == "own":  # dropout draws from a generator of its own (as each run's does in the trainer)
        model.net[2].generator = generator

    torch.manual_seed(1)
    generator.manual_seed(1)
    criterion(model(x), y, ids).backward()
    big = _grads(model)

    model.zero_grad()
    torch.manual_seed(1)
    generator.manual_seed(1)
    grad_cache(model, criterion, x, y, ids, micro_batch=8, generators=[generator] if stream == "own" else [])
    cached = _grads(model)
    for g_big, g_cache in zip(big, cached, strict=True):
        assert torch.allclose(g_big, g_cache, atol=1e-6, rtol=0)

    # Naive accumulation (each micro-batch its own loss, 7 negatives instead of 31) is not the same.
    model.zero_grad()
    torch.manual_seed(1)
    for xc, yc, ic in zip(x.split(8), y.split(8), ids.split(8), strict=True):
        (criterion(model(xc), yc, ic) / 4).backward()
    naive = _grads(model)
    assert max((a - b).abs().max().item() for a, b in zip(big, naive, strict=True)) > 1e-3


@pytest.mark.parametrize("loss", ["mse", "cosine", "infonce", "combined"])
def test_accumulated_training_follows_the_large_batch_run(loss):
    one = tiny_run(loss=loss, batch_size=32, epochs=2, lr=1e-2)
    acc = tiny_run(loss=loss, batch_size=8, accumulation_steps=4, epochs=2, lr=1e-2)
    _, h1 = _history(one)
    _, h2 = _history(acc)
    for a, b in zip(h1, h2, strict=True):
        for key in ("train/loss", "val/loss", "val/cosine", "grad_norm"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-4, abs=1e-6), key


def test_same_spec_gives_the_same_numbers_twice():
    spec = tiny_run(loss="combined", epochs=3, model={"hidden": [16], "dropout": 0.2})
    _, h1 = _history(spec)
    _, h2 = _history(spec)
    for a, b in zip(h1, h2, strict=True):
        ma = {k: v for k, v in a.metrics.items() if k != "epoch_seconds"}
        mb = {k: v for k, v in b.metrics.items() if k != "epoch_seconds"}
        assert ma == mb


def test_different_seeds_give_different_numbers():
    _, h1 = _history(tiny_run(seed=0))
    _, h2 = _history(tiny_run(seed=1))
    assert h1[-1].metrics["train/loss"] != h2[-1].metrics["train/loss"]


def test_every_epoch_reports_the_vocabulary():
    _, hist = _history(tiny_run(loss="combined", epochs=2))
    for r in hist:
        for key in (*METRIC_KEYS, "lr", "grad_norm", "epoch_seconds"):
            assert key in r.metrics, key
        for part in ("infonce", "cosine", "mse"):
            assert f"train/loss_{part}" in r.metrics
        assert 0.0 <= r.metrics["train/inbatch_top1"] <= 1.0
        assert r.metrics["epoch_seconds"] > 0


def test_combined_train_loss_is_the_weighted_sum_of_its_logged_parts():
    _, hist = _history(tiny_run(loss="combined", alpha=0.6, beta=0.3, gamma=0.1, epochs=1))
    m = hist[0].metrics
    expected = 0.6 * m["train/loss_infonce"] + 0.3 * m["train/loss_cosine"] + 0.1 * m["train/loss_mse"]
    assert m["train/loss"] == pytest.approx(expected, rel=1e-5)


def test_multistage_switches_loss_and_learning_rate_at_the_boundaries():
    spec = tiny_run(loss="multistage", epochs=6, stage1_epochs=2, stage2_epochs=2, stage_lrs=(1e-2, 5e-3, 1e-3))
    _, hist = _history(spec)
    assert [r.stage for r in hist] == ["mse_warmup"] * 2 + ["contrastive"] * 2 + ["finetune"] * 2
    assert [r.metrics["stage"] for r in hist] == [1, 1, 2, 2, 3, 3]
    assert [r.metrics["lr"] for r in hist] == [1e-2, 1e-2, 5e-3, 5e-3, 1e-3, 1e-3]


def test_warmup_and_cosine_decay_follow_their_formulas():
    spec = tiny_run(epochs=6, lr=0.01, warmup_epochs=2, lr_schedule="cosine")
    _, hist = _history(spec)
    expected = [0.005, 0.01] + [0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [r.metrics["lr"] for r in hist] == pytest.approx(expected)


def test_best_epoch_is_tracked_and_its_state_reproduces_the_metric(tmp_path):
    spec = tiny_run(loss="infonce", epochs=5, select_metric="val/mrr")
    trainer, hist = _history(spec)
    values = [r.metrics["val/mrr"] for r in hist]
    assert trainer.best.epoch == values.index(max(values))
    assert trainer.best.value == max(values)
    assert hist[-1].best_epoch == trainer.best.epoch

    path = trainer.save_best(tmp_path / "best.pt")
    state = torch.load(path)
    trainer.model.load_state_dict(state)
    val = trainer.val
    mrr = compute_retrieval_metrics(trainer.predict(val.pocket), val.ligand, ligand_ids=val.ligand_id)["mrr"]
    assert mrr == pytest.approx(max(values), abs=1e-6)


def test_a_run_whose_outputs_turn_nan_stops_and_says_so():
    spec = tiny_run(epochs=10, model={"factory": "support:breaks_after", "kwargs": {"calls": 12}})
    _, hist = _history(spec)
    assert len(hist) < 10
    assert hist[-1].diverged
    assert not math.isfinite(hist[-1].metrics["train/loss"])
    assert all(not r.diverged for r in hist[:-1])


def test_learnable_temperature_is_trained_and_logged():
    _, hist = _history(tiny_run(loss="infonce", learnable_temperature=True, temperature=0.2, lr=0.05))
    temps = [r.metrics["temperature"] for r in hist]
    assert temps[-1] != pytest.approx(0.2)
    assert all(0.01 <= t <= 1.0 for t in temps)


def test_bf16_autocast_on_cpu_trains_with_finite_numbers():
    _, hist = _history(tiny_run(loss="infonce", amp=True, temperature=0.01))
    assert all(math.isfinite(v) for r in hist for k, v in r.metrics.items() if k != "epoch_seconds")


def test_batch_larger_than_training_set_is_a_clear_error():
    spec = tiny_run(batch_size=512)
    split = load_split(spec.data)
    train, val = split.train, split.val
    with pytest.raises(AblateError, match=r"batch of 512 pairs .* larger than the training set"):
        Trainer(spec, train, val)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(AblateError, match=r"'cuda:1' is not available .*0 CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(AblateError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_inbatch_top1_counts_rows_that_rank_their_own_ligand_first():
    spec = tiny_run(batch_size=8)
    split = load_split(spec.data)
    train, val = split.train, split.val
    trainer = Trainer(spec, train, val)
    idx = torch.arange(16).view(2, 1, 8)  # [steps, members, batch]
    perfect = train.ligand[idx]
    assert trainer._inbatch_correct(perfect, idx).item() == 16
    # A constant output ranks the same ligand first for every row: at most one hit per batch (chance).
    constant = torch.ones(2, 1, 8, train.ligand_dim)
    assert trainer._inbatch_correct(constant, idx).item() <= 2
    # Exact ties count as misses.
    tied = trainer.train_unit.clone()
    trainer.train_unit = torch.ones_like(tied)
    assert trainer._inbatch_correct(constant, idx).item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [True, False])
def test_adamw_equals_torch_optim_adamw(dtype, fused):
    """ablate's AdamW against torch.optim.AdamW (the reference): two groups with their own learning
    rate and weight decay, a parameter that gets no gradient at first, a changed learning rate."""
    from ablate.training.devices import AdamW

    torch.manual_seed(0)
    shapes = [(5, 3), (3,), (4, 4), (2,)]
    ours = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    opt = AdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "lr": 3e-2}], 1e-2,
                torch.device("cpu"))
    opt.fused = fused
    ref = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": 0.1}, {"params": theirs[2:], "lr": 3e-2}],
                            lr=1e-2, fused=fused, foreach=not fused)
    for step in range(6):
        grads = [torch.randn(s, dtype=dtype) for s in shapes]
        for params in (ours, theirs):
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = None if (step == 0 and i == 3) else g.clone()
        if step == 3:
            opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 5e-3
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)
    for a, b in zip(ours, theirs, strict=True):
        mine, torch_state = opt.state[a], ref.state[b]
        assert set(mine) == set(torch_state)
        assert all(torch.equal(mine[k], torch_state[k]) for k in mine)


def test_a_gradient_scaler_steps_ablates_adamw_as_if_unscaled_and_skips_overflowing_steps():
    """torch.amp.GradScaler (float16 training) drives ablate's AdamW through unscale_ and step: a
    power-of-two scale changes nothing, and a step whose scaled gradients overflow is skipped."""
    from ablate.training.devices import Amp

    spec = tiny_run(loss="infonce", epochs=2)
    plain, _ = _history(spec)
    scaled = Trainer.from_spec(spec)
    scaled.amp = Amp(False, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6))
    list(scaled.epochs())
    for a, b in zip(plain.model.parameters(), scaled.model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)

    overflow = Trainer.from_spec(spec)
    overflow.amp = Amp(False, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**127))  # loss x scale: inf
    overflowed = []  # per step, whether the (scaled) gradient of one parameter is not finite
    next(overflow.model.parameters()).register_hook(lambda g: overflowed.append(not torch.isfinite(g).all().item()))
    result = next(overflow.epochs())
    assert result.metrics["amp_skipped_steps"] == overflowed.count(True) > 0
    assert overflow.amp.scaler.get_scale() < 2.0**127  # the scaler backed off
    assert all(torch.isfinite(p).all() for p in overflow.model.parameters())


def test_adamw_takes_a_group_of_mixed_dtypes_like_torch_optim_adamw():
    from ablate.training.devices import AdamW

    torch.manual_seed(1)
    ours = [torch.randn(4, 3, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    opt = AdamW([{"params": ours}], 1e-2, torch.device("cpu"))
    ref = torch.optim.AdamW(theirs, lr=1e-2, fused=True)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for params in (ours, theirs):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        opt.step()
        ref.step()
    assert opt.fused
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("loss", ["mse", "infonce"])
def test_validation_loss_is_the_formula_on_the_model_s_outputs(loss):
    """val/loss from first principles: MSE over the whole set; InfoNCE (symmetric, shared ligands
    masked) averaged over batches of the training size, each weighted by its rows."""
    spec = tiny_run(loss=loss, epochs=1, temperature=0.1, batch_size=16)
    trainer, history = _history(spec)
    val = trainer.val
    pred = trainer.predict(val.pocket).double()
    target = val.ligand.double()
    if loss == "mse":
        want = ((pred - target) ** 2).mean().item()
    else:
        n = len(val)
        parts = torch.arange(n).tensor_split(math.ceil(n / 16))
        total = 0.0
        for part in parts:
            p = torch.nn.functional.normalize(pred[part], dim=1)
            t = torch.nn.functional.normalize(target[part], dim=1)
            logits = p @ t.T / 0.1
            ids = val.ligand_id[part]
            shared = (ids[:, None] == ids[None, :]) & ~torch.eye(len(part), dtype=torch.bool)
            logits = logits.masked_fill(shared, float("-inf"))
            labels = torch.arange(len(part))
            ce = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                        + torch.nn.functional.cross_entropy(logits.T, labels))
            total += ce.item() * len(part)
        want = total / n
        assert len(parts) > 1
    assert history[-1].metrics["val/loss"] == pytest.approx(want, rel=1e-5)
