"""The one training loop: ``Trainer.epochs()`` yields one EpochResult per epoch; it knows neither MLflow nor Optuna.

Data stay on the device as tensors and batches are taken by index from a per-epoch permutation.
With ``accumulation_steps > 1`` a batch is processed in micro-batches: per-sample losses (MSE,
cosine) accumulate their gradients directly; contrastive losses use GradCache (Gao et al. 2021):
representations of all micro-batches are computed without a graph, the loss and its gradient
with respect to the representations are computed over the whole batch, then each micro-batch is
re-run (with its dropout noise replayed) and back-propagated with its slice of that gradient. The
parameter gradient then equals the one of a single large batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.data import PairedEmbeddings, load_split
from ablate.devices import adamw, amp_for, resolve_device, threads_for, use_threads
from ablate.errors import AblateError
from ablate.losses import CombinedLoss, InfoNCELoss, MultiStageScheduler, build_loss
from ablate.metrics import compute_retrieval_metrics
from ablate.models import build_model
from ablate.specs import METRIC_KEYS, RunSpec, better

INBATCH_FLUSH = 64
"""Steps whose representations are scored together for train/inbatch_top1."""


@dataclass(frozen=True)
class EpochResult:
    """What one epoch reports: metrics under the vocabulary's keys (may be non-finite).

    ``best_epoch`` is the epoch with the best selection metric so far (-1 before the first finite one).
    """

    epoch: int
    metrics: dict[str, float]
    stage: str | None = None
    best_epoch: int = -1
    diverged: bool = False


class Best:
    """The best value so far of every metric of the vocabulary, each in its direction, and its epoch.

    One instance per run serves the run's summary, the value a search reports to its pruner and the
    model kept at the best epoch of the selection metric (``state``).
    """

    def __init__(self, select: str):
        self.select = select
        self.values: dict[str, float] = {}
        self.epochs: dict[str, int] = {}
        self.state: dict[str, Tensor] | None = None

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Take in one epoch's metrics; returns whether the selection metric improved."""
        improved = False
        for key in METRIC_KEYS:
            v = metrics.get(key)
            if v is None or not math.isfinite(v):
                continue
            old = self.values.get(key)
            if old is None or (v > old if better(key) == "maximize" else v < old):
                self.values[key], self.epochs[key] = v, epoch
                improved |= key == self.select
        return improved

    @property
    def epoch(self) -> int:
        """The epoch of the best selection metric (-1 before the first finite value)."""
        return self.epochs.get(self.select, -1)

    @property
    def value(self) -> float:
        """The best selection metric (NaN before the first finite value)."""
        return self.values.get(self.select, float("nan"))


def check(spec: RunSpec) -> tuple[PairedEmbeddings, PairedEmbeddings]:
    """Everything about a run that fails the same way for every trial: data, batch, device, model.

    Returns the run's (train, val) split. A study checks its runs with this before any trial starts.
    """
    train, val = load_split(spec.data)
    check_batch(spec, len(train))
    resolve_device(spec.device)
    build_model(spec.model, train.pocket_dim, train.ligand_dim)
    return train, val


def check_batch(spec: RunSpec, n_train: int) -> None:
    """A batch must fit in the training set (batches that do not fill up are dropped)."""
    eff = spec.effective_batch_size
    if eff > n_train:
        raise AblateError(
            f"batch of {eff} pairs (batch_size {spec.batch_size} x accumulation_steps "
            f"{spec.accumulation_steps}) is larger than the training set ({n_train} pairs); "
            "lower the batch size or use more data"
        )


class Trainer:
    """One training run of a RunSpec on (train, val) pairs; iterate ``epochs()`` to train."""

    def __init__(
        self,
        spec: RunSpec,
        train: PairedEmbeddings,
        val: PairedEmbeddings,
        device: torch.device | None = None,
    ):
        self.spec = spec
        self.device = device if device is not None else resolve_device(spec.device)
        check_batch(spec, len(train))
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # so that nothing lands on GPU 0 by default
        torch.manual_seed(spec.seed)
        self.train = train.to(self.device)
        self.val = val.to(self.device)
        self.model = build_model(spec.model, train.pocket_dim, train.ligand_dim).to(self.device)
        use_threads(threads_for(spec.batch_size, sum(p.numel() for p in self.model.parameters()), self.device))
        self.loss = build_loss(spec.loss, **spec.loss_params()).to(self.device)
        self.scheduler = self.loss if isinstance(self.loss, MultiStageScheduler) else None
        self.amp = amp_for(self.device, spec.amp)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        extra = [p for p in self.loss.parameters() if p.requires_grad]
        groups = [{"params": self.params, "weight_decay": spec.weight_decay}]
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
        self.all_params = self.params + extra
        self.optimizer = adamw(groups, spec.lr, self.device)
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.train_unit = F.normalize(self.train.ligand, dim=1)
        self.best = Best(spec.select_metric)

    @classmethod
    def from_spec(cls, spec: RunSpec) -> Trainer:
        """A trainer on the split the spec's data names (loaded once per process)."""
        train, val = load_split(spec.data)
        return cls(spec, train, val)

    # ---------------------------------------------------------------- the loop

    def epochs(self) -> Iterator[EpochResult]:
        """Train epoch by epoch, yielding each epoch's metrics; stops early on divergence."""
        for epoch in range(self.spec.epochs):
            start = time.perf_counter()
            criterion, stage = self._criterion(epoch)
            lr = self._set_lr(epoch)
            metrics = self._train_epoch(criterion)
            metrics.update(self._validate(criterion))
            metrics["lr"] = lr
            if self.scheduler is not None:
                metrics["stage"] = float(self.scheduler.stage + 1)
            infonce = getattr(criterion, "infonce", criterion)  # the combined loss holds one
            if self.spec.learnable_temperature and isinstance(infonce, InfoNCELoss):
                metrics["temperature"] = infonce.temperature
            metrics["epoch_seconds"] = time.perf_counter() - start
            diverged = not (math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/cosine"]))
            if not diverged and self.best.update(epoch, metrics):
                self.best.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            yield EpochResult(epoch, metrics, stage, self.best.epoch, diverged)
            if diverged:
                return

    def _criterion(self, epoch: int) -> tuple[nn.Module, str | None]:
        if self.scheduler is not None:
            return self.scheduler.get_loss(epoch)
        return self.loss, None

    def _set_lr(self, epoch: int) -> float:
        s = self.spec
        base = self.scheduler.get_recommended_lr() if self.scheduler is not None else s.lr
        factor = 1.0
        if epoch < s.warmup_epochs:
            factor = (epoch + 1) / s.warmup_epochs
        elif s.lr_schedule == "cosine":
            span = max(1, s.epochs - s.warmup_epochs)
            factor = 0.5 * (1.0 + math.cos(math.pi * (epoch - s.warmup_epochs) / span))
        lr = base * factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ---------------------------------------------------------------- training

    def _train_epoch(self, criterion: nn.Module) -> dict[str, float]:
        s = self.spec
        self.model.train()
        data = self.train
        eff = s.effective_batch_size
        steps = len(data) // eff
        perm = torch.randperm(len(data), generator=self.generator).to(self.device)
        xs, ys = data.pocket[perm], data.ligand[perm]
        contrastive = getattr(criterion, "contrastive", False)
        ids_all = data.ligand_id[perm] if s.mask_shared_ligands and contrastive else None
        losses: list[Tensor] = []
        norms: list[Tensor | Sequence[Tensor]] = []
        components: dict[str, list[Tensor]] = {}
        pending: list[Tensor] = []
        correct = torch.zeros((), device=self.device)
        for step in range(steps):
            lo, hi = step * eff, (step + 1) * eff
            x, y = xs[lo:hi], ys[lo:hi]
            lid = None if ids_all is None else ids_all[lo:hi]
            if s.accumulation_steps == 1:
                with self.amp.autocast():
                    p = self.model(x)
                loss = criterion(p, y, lid)
                self._backward(loss)
                reps = p.detach()
            elif contrastive:
                loss, reps = self._gradcache(criterion, x, y, lid)
            else:
                loss, reps = self._accumulate(criterion, x, y)
            norms.append(self._optimizer_step())
            losses.append(loss.detach())
            if isinstance(criterion, CombinedLoss):
                for name, value in criterion.last_components.items():
                    components.setdefault(name, []).append(value)
            pending.append(reps)
            if len(pending) == INBATCH_FLUSH or step == steps - 1:
                first = (step + 1 - len(pending)) * eff
                correct += self._inbatch_correct(pending, perm[first : (step + 1) * eff])
                pending = []
        grad_norm, skipped = _mean_total_norm(norms, skip_nonfinite=self.amp.scaler is not None)
        out = {
            "train/loss": torch.stack(losses).float().mean(),
            "train/inbatch_top1": correct / (steps * eff),
            "grad_norm": grad_norm,
        }
        if self.amp.scaler is not None:  # steps the scaler skipped after an overflow
            out["amp_skipped_steps"] = skipped
        for name, parts in components.items():
            out[f"train/loss_{name}"] = torch.stack(parts).mean()
        numbers: list[float] = torch.stack([v.float() for v in out.values()]).tolist()
        return dict(zip(out, numbers, strict=True))

    def _backward(self, loss: Tensor) -> None:
        if self.amp.scaler is not None:
            self.amp.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> Tensor | Sequence[Tensor]:
        scaler = self.amp.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        norm: Tensor | Sequence[Tensor]
        if self.spec.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.all_params, self.spec.grad_clip)
        else:  # per-parameter norms now (one op); their total is taken once per epoch
            grads = [p.grad for p in self.all_params if p.grad is not None]
            norm = torch._foreach_norm(grads)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _accumulate(self, criterion: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample losses: each micro-batch's gradient, weighted by its share of the batch."""
        n = x.shape[0]
        total = torch.zeros((), device=self.device)
        reps = []
        for xc, yc in zip(x.split(self.spec.batch_size), y.split(self.spec.batch_size), strict=True):
            with self.amp.autocast():
                p = self.model(xc)
            part = criterion(p, yc) * (xc.shape[0] / n)
            self._backward(part)
            total += part.detach()
            reps.append(p.detach())
        return total, torch.cat(reps)

    def _gradcache(
        self, criterion: nn.Module, x: Tensor, y: Tensor, lid: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        return grad_cache(
            self.model, criterion, x, y, lid, self.spec.batch_size,
            autocast=self.amp.autocast, backward=self._backward,
        )

    def _inbatch_correct(self, reps: list[Tensor], idx: Tensor) -> Tensor:
        """How many rows rank their own ligand first among their batch (ties count as misses)."""
        r = torch.stack(reps).float()  # [m, B, D]
        idx = idx.view(r.shape[0], r.shape[1])
        sims = torch.bmm(r, self.train_unit[idx].transpose(1, 2))  # [m, B, B]; row norms do not matter
        ids = self.train.ligand_id[idx]
        same = ids[:, :, None] == ids[:, None, :]
        pos = sims.masked_fill(~same, float("-inf")).amax(2)
        neg = sims.masked_fill(same, float("-inf")).amax(2)
        return (pos > neg).sum()

    # ---------------------------------------------------------------- validation

    @torch.no_grad()
    def predict(self, pocket: Tensor, chunk: int = 8192) -> Tensor:
        """The model's ligand-space embeddings for pocket features (eval mode, float32)."""
        self.model.eval()
        outs = []
        for xc in pocket.to(self.device).split(chunk):
            with self.amp.autocast():
                outs.append(self.model(xc).float())
        return torch.cat(outs)

    @torch.no_grad()
    def _validate(self, criterion: nn.Module) -> dict[str, float]:
        val = self.val
        pred = self.predict(val.pocket)
        ids = val.ligand_id if self.spec.mask_shared_ligands else None
        n_batches = max(1, math.ceil(len(val) / self.spec.effective_batch_size))
        if getattr(criterion, "contrastive", False) and n_batches > 1:
            parts = torch.arange(len(val), device=self.device).tensor_split(n_batches)
            total = torch.zeros((), device=self.device)
            for part in parts:
                part_ids = None if ids is None else ids[part]
                total += criterion(pred[part], val.ligand[part], part_ids) * part.numel()
            vloss = total / len(val)
        else:
            vloss = criterion(pred, val.ligand, ids)
        r = compute_retrieval_metrics(pred, val.ligand, ligand_ids=val.ligand_id, reverse=False)
        return {
            "val/loss": float(vloss),
            "val/cosine": r["mean_cosine"],
            "val/top1": r["top1_accuracy"],
            "val/top5": r["top5_accuracy"],
            "val/top10": r["top10_accuracy"],
            "val/mrr": r["mrr"],
            "val/median_rank": r["median_rank"],
            "val/alignment": r["alignment"],
            "val/uniformity": r["uniformity"],
            "val/spread": r["spread"],
        }

    # ---------------------------------------------------------------- results

    def save_best(self, path: str | Path) -> Path:
        """Write the best epoch's model state (state_dict) to a file."""
        if self.best.state is None:
            raise AblateError("no best model to save: no epoch produced a finite selection metric")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.best.state.items()}, out)
        return out


def _mean_total_norm(norms: list[Tensor | Sequence[Tensor]], skip_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    """The mean over steps of the gradient's total norm (from per-step totals or per-parameter
    norms) and the number of steps left out as non-finite (with ``skip_nonfinite``: the steps a
    float16 grad scaler skipped after an overflow, which are not a divergence)."""
    steps = [[step] if isinstance(step, Tensor) else list(step) for step in norms]
    if len({len(step) for step in steps}) == 1:
        per_step = torch.linalg.vector_norm(torch.stack([n for step in steps for n in step]).float()
                                            .view(len(steps), -1), dim=1)
    else:  # a model whose set of parameters with gradients changes between steps
        per_step = torch.stack([torch.linalg.vector_norm(torch.stack(step).float()) for step in steps])
    if not skip_nonfinite:
        return per_step.mean(), torch.zeros(())
    finite = torch.isfinite(per_step)
    kept = per_step[finite]
    mean = kept.mean() if kept.numel() else torch.full((), float("nan"), device=per_step.device)
    return mean, (~finite).sum()


def grad_cache(
    model: nn.Module,
    criterion: nn.Module,
    x: Tensor,
    y: Tensor,
    ligand_ids: Tensor | None,
    micro_batch: int,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> tuple[Tensor, Tensor]:
    """Accumulate the gradient of a batch-level loss over micro-batches (GradCache).

    1. embed every micro-batch without a graph, keeping each one's RNG state (dropout);
    2. compute the loss over the whole batch on the cached embeddings and back-propagate it to
       them (and to the loss's own parameters, e.g. a learnable temperature);
    3. re-embed each micro-batch with the same RNG state and back-propagate its slice of the
       cached gradient. The parameter gradients equal those of one large batch.

    Returns the loss (detached) and the embeddings.
    """
    chunks = x.split(micro_batch)
    device = x.device
    states = []
    reps = []
    with torch.no_grad():
        for xc in chunks:
            states.append(_rng_state(device))
            with autocast():
                reps.append(model(xc))
    cached = torch.cat(reps).to(torch.promote_types(reps[0].dtype, torch.float32)).requires_grad_()
    loss = criterion(cached, y, ligand_ids)
    backward(loss)
    assert cached.grad is not None
    for xc, state, grad in zip(chunks, states, cached.grad.split(micro_batch), strict=True):
        _set_rng_state(device, state)
        with autocast():
            out = model(xc)
        out.backward(grad.to(out.dtype))
    return loss.detach(), cached.detach()


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    dev = None
    if device.type == "cuda":
        dev = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        dev = torch.mps.get_rng_state()
    return torch.get_rng_state(), dev


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        if device.type == "cuda":
            torch.cuda.set_rng_state(state[1], device)
        else:
            torch.mps.set_rng_state(state[1])
