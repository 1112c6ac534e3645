"""The one training loop. ``Trainer.epochs()`` trains one run and yields one EpochResult per epoch;
``Trainer.array()`` trains K compatible runs side by side (an array) and yields each member's
results per epoch. A single run is the array of one. The trainer knows neither MLflow nor Optuna.

Members of an array agree on everything that shapes the computation (``fusion_key``: model,
batch size, accumulation, epochs, data, device, precision) and differ in anything else: seed
(initialisation and batch order), learning rate and schedule, weight decay, loss and its weights,
temperature (also learnable), clipping, shared-ligand masking. Each member keeps its own
parameters, optimizer state, batch order and best epoch, so it trains exactly as it would alone;
the models run together on a leading member axis (``models.MemberModels``) and the losses are
computed at once (``losses.MemberLosses``). A member that stops (pruned, unstable, diverged) is
dropped at the end of the epoch and never touches the others' numbers.

Data stay on the device as tensors and batches are taken by index from a per-epoch permutation.
With ``accumulation_steps > 1`` a batch is processed in micro-batches: per-sample losses (MSE,
cosine) accumulate their gradients directly; contrastive losses use GradCache (``ablate.training.gradcache``),
so the parameter gradient equals the one of a single large batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate import losses as loss_registry
from ablate.errors import AblateError
from ablate.losses._members import MemberLosses
from ablate.metrics import retrieval_by_member, screening_by_member
from ablate.specs import SCREENING_METRICS, SHAPING_FIELDS, RunSpec, better
from ablate.training.data import PairedEmbeddings, Split, load_split
from ablate.training.devices import AdamW, amp_for, free_bytes, resolve_device, threads_for, use_threads
from ablate.training.gradcache import grad_cache
from ablate.training.models import Dropout, Fusion, MemberModels, ProjectionHead, SelectedModel, build_model, check_size

INBATCH_FLUSH = 64
"""Steps whose representations are scored together for train/inbatch_top1."""


@dataclass(frozen=True)
class EpochResult:
    """What one epoch reports: metrics under the vocabulary's keys (may be non-finite).

    ``best_epoch`` is the selected epoch so far: the best selection metric (-1 before the first finite one).
    """

    epoch: int
    metrics: dict[str, float]
    stage: str | None = None
    best_epoch: int = -1
    diverged: bool = False
    stopped_early: bool = False
    """Early stopping ends the run here (``patience`` epochs without a better selection metric)."""
    error: str | None = None
    """Why the run's loss failed in this epoch (a user's loss that raised or returned no usable value)."""


class Best:
    """A run's selected epoch: the epoch with the best selection metric so far (a validation metric), every
    metric at that epoch, and the model and loss state (a learnable temperature) kept there.

    One instance per run serves the run's summary, the value a search reports to its pruner, early
    stopping, the model scored on the test split and the model logged.
    """

    def __init__(self, select: str):
        self.select = select
        self.epoch = -1
        """The selected epoch (-1 before the first finite selection metric)."""
        self.metrics: dict[str, float] = {}
        """Every finite metric at the selected epoch."""
        self.state: dict[str, Tensor] | None = None
        self.criterion_state: dict[str, Tensor] | None = None

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Take in one epoch's metrics; returns whether the selection metric improved (the epoch is then selected)."""
        v = metrics.get(self.select)
        if v is None or not math.isfinite(v):
            return False
        old = self.metrics.get(self.select)
        if old is not None and not (v > old if better(self.select) == "maximize" else v < old):
            return False
        self.epoch, self.metrics = epoch, {k: x for k, x in metrics.items() if math.isfinite(x)}
        return True

    @property
    def value(self) -> float:
        """The selection metric at the selected epoch (NaN before the first finite value)."""
        return self.metrics.get(self.select, float("nan"))

    def document(self) -> dict[str, Any]:
        """The selection as a checkpoint keeps it."""
        return {"epoch": self.epoch, "metrics": dict(self.metrics), "state": self.state,
                "criterion_state": self.criterion_state}

    def load(self, doc: dict[str, Any]) -> None:
        """The selection as ``document`` gave it."""
        self.epoch, self.metrics = int(doc["epoch"]), dict(doc["metrics"])
        self.state, self.criterion_state = doc["state"], doc["criterion_state"]


def patience_over(spec: RunSpec, best: Best, epoch: int) -> bool:
    """Whether early stopping ends the run after ``epoch``: its selection metric has not improved for
    ``patience`` epochs, counted from the start of its last stage (a multi-stage run), never at the last epoch."""
    if spec.patience is None or epoch >= spec.epochs - 1:
        return False
    return epoch - max(best.epoch, spec.last_stage_start - 1) >= spec.patience


def fusion_key(spec: RunSpec) -> Hashable:
    """What runs must share to train as one array: model, batch size, accumulation, epochs, data,
    device and precision. Everything else may differ between members."""
    doc = spec.model_dump(mode="json")
    return json.dumps([doc[f] for f in SHAPING_FIELDS], sort_keys=True)


def check(spec: RunSpec) -> Split:
    """Everything about a run that fails the same way for every trial: data, batch, device, model.

    Returns the run's split. A study checks its runs with this before any trial starts.
    """
    split = load_split(spec.data)
    check_batch(spec, len(split.train))
    device = resolve_device(spec.device)
    check_size(spec, split.train.pocket_dim, split.train.ligand_dim, free_bytes(device))
    with torch.random.fork_rng(devices=[]):
        build_model(spec.model, split.train.pocket_dim, split.train.ligand_dim)
    return split


def check_batch(spec: RunSpec, n_train: int) -> None:
    """A batch must fit in the training set (batches that do not fill up are dropped)."""
    eff = spec.effective_batch_size
    if eff > n_train:
        raise AblateError(
            f"batch of {eff} pairs (batch_size {spec.batch_size} x accumulation_steps "
            f"{spec.accumulation_steps}) is larger than the training set ({n_train} pairs); "
            "lower the batch size or use more data"
        )


class Member:
    """One run of an array: its spec, model, criterion, batch order, best epoch and whether it still trains."""

    def __init__(self, index: int, spec: RunSpec, model: nn.Module, criterion: nn.Module, device: torch.device):
        self.index = index
        self.spec = spec
        self.model = model
        self.criterion = criterion
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.noise = torch.Generator(device).manual_seed(spec.seed ^ _NOISE_SEED)
        """The built-in head's dropout stream: the member's own, whatever trains beside it. (A user's model draws
        from torch's stream, alone and under vmap alike.)"""
        if isinstance(model, ProjectionHead):
            for layer in model.net:
                if isinstance(layer, Dropout):
                    layer.generator = self.noise
        self.best = Best(spec.select_metric)
        self.stopped = False
        self.params: list[nn.Parameter] = [
            p for p in [*self.model.parameters(), *self.criterion.parameters()] if p.requires_grad]
        """Every trained parameter of the member: its model's, then its loss's (a learnable temperature)."""


class Trainer:
    """Training of one RunSpec, or of K compatible RunSpecs as one array, on (train, val) pairs.

    Iterate ``epochs()`` (one run) or ``array()`` (any number) to train.
    """

    def __init__(
        self,
        specs: RunSpec | Sequence[RunSpec],
        train: PairedEmbeddings,
        val: PairedEmbeddings,
        device: torch.device | None = None,
        *,
        test: PairedEmbeddings | None = None,
        dtype: torch.dtype | None = None,
        fusion: Fusion | None = None,
    ):
        runs = [specs] if isinstance(specs, RunSpec) else list(specs)
        if not runs:
            raise ValueError("a trainer needs at least one run")
        keys = {fusion_key(s) for s in runs}
        if len(keys) > 1:
            raise ValueError("the runs of one array must agree on model, batch size, accumulation, epochs, "
                             "data, device and precision")
        lead = runs[0]
        self.specs = runs
        self.device = device if device is not None else resolve_device(lead.device)
        check_batch(lead, len(train))
        if lead.model.factory == "mlp":  # refused before anything is allocated (a user's model: by check())
            check_size(lead, train.pocket_dim, train.ligand_dim, free_bytes(self.device))
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # so that nothing lands on GPU 0 by default
        self.train = _to(train, self.device, dtype)
        self.val = _to(val, self.device, dtype)
        self.test = None if test is None else _to(test, self.device, dtype)
        """The pairs each run's selected model is scored on once, when it ends (``test``)."""
        self.dtype = dtype
        self.every: list[Member] = []
        for k, spec in enumerate(runs):
            torch.manual_seed(spec.seed)  # each member's initialisation is the one it has alone
            model = build_model(spec.model, train.pocket_dim, train.ligand_dim).to(self.device, dtype)
            criterion = loss_registry.build(spec).to(self.device, dtype)
            self.every.append(Member(k, spec, model, criterion, self.device))
        self.members = list(self.every)
        """The members still training (``every`` holds them all)."""
        self.models = MemberModels([m.model for m in self.members], fusion)
        self.losses = _member_losses([m.criterion for m in self.members], runs)
        n_params = sum(p.numel() for p in self.members[0].model.parameters())
        use_threads(threads_for(lead.batch_size, n_params * len(runs), self.device))
        self.amp = amp_for(self.device, lead.amp)
        if self.amp.scaler is not None and len(runs) > 1:
            raise ValueError("float16 with a gradient scaler skips steps for the whole array: train such runs alone")
        self._sets: list[tuple[int, list[nn.Parameter], float]] = []
        """What the optimizer's groups are made of: (member index, parameters, weight decay)."""
        for m in self.members:
            self._sets.append((m.index, list(m.model.parameters()), m.spec.weight_decay))
            extra = [p for p in m.criterion.parameters() if p.requires_grad]
            if extra:
                self._sets.append((m.index, extra, 0.0))
        self._grouping: tuple[tuple[int, ...], ...] = ()
        self._owners: tuple[tuple[int, ...], Tensor] = ((), torch.zeros(0))
        self.optimizer = AdamW([{"params": [p for _, ps, _ in self._sets for p in ps]}], lead.lr, self.device)
        self.train_unit = F.normalize(self.train.ligand, dim=1)
        self.floors: dict[str, float] = {}
        """What a random ranking scores on the validation set (val/ef1 -> 1.0, ...), known after an epoch."""
        self.start_epoch = 0
        """The first epoch to train (after ``restore``, the one after the checkpoint's)."""
        self.fallback = None if len(runs) == 1 else self.models.check_fusion(
            self.train.pocket[: min(2, len(self.train))].expand(len(runs), -1, -1))

    @classmethod
    def from_spec(cls, spec: RunSpec | Sequence[RunSpec]) -> Trainer:
        """A trainer on the split the spec's data names (loaded once per process)."""
        lead = spec if isinstance(spec, RunSpec) else spec[0]
        split = load_split(lead.data)
        return cls(spec, split.train, split.val, test=split.test)

    # ---------------------------------------------------------------- one run

    @property
    def spec(self) -> RunSpec:
        """The (first) run's spec."""
        return self.specs[0]

    @property
    def model(self) -> nn.Module:
        """The (first) run's model."""
        return self.every[0].model

    @property
    def best(self) -> Best:
        """The (first) run's best epoch."""
        return self.every[0].best

    def epochs(self) -> Iterator[EpochResult]:
        """Train one run epoch by epoch, yielding each epoch's metrics; stops early on divergence."""
        if len(self.specs) != 1:
            raise ValueError("epochs() trains one run; use array() for several")
        for results in self.array():
            yield from results.values()

    # ---------------------------------------------------------------- the loop

    def array(self) -> Iterator[dict[int, EpochResult]]:
        """Train every member epoch by epoch; yields {member index: its epoch's result} for the members
        still training. A member stops after a diverged epoch, or when ``stop`` is called for it."""
        for epoch in range(self.start_epoch, self.spec.epochs):
            if not self.members:
                return
            start = time.perf_counter()
            stages = self.losses.set_epoch(epoch)
            lrs = self._set_lr(epoch)
            train = self._train_epoch()
            val = self._validate()
            seconds = time.perf_counter() - start
            results = {}
            for k, member in enumerate(self.members):
                metrics = {**{key: v[k] for key, v in train.items() if math.isfinite(v[k]) or key in _ALWAYS},
                           **val[k], "lr": lrs[k]}
                if stages[k] is not None:  # a schedule: its 1-based stage
                    metrics["stage"] = float(getattr(member.criterion, "stage", 0)) + 1
                metrics.update(self.losses.logged(k))
                metrics["epoch_seconds"] = seconds
                error = self.losses.failed[k]
                diverged = error is None and not (
                    math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/cosine"]))
                if error is None and not diverged and member.best.update(epoch, metrics):
                    member.best.state = _kept(member.model.state_dict())
                    member.best.criterion_state = _kept(member.criterion.state_dict())
                early = error is None and not diverged and patience_over(member.spec, member.best, epoch)
                results[member.index] = EpochResult(epoch, metrics, stages[k], member.best.epoch, diverged, early,
                                                    error)
                member.stopped |= diverged or early or error is not None
            yield results
            self._drop_stopped()

    def stop(self, index: int) -> None:
        """Stop a member (by its index among the specs): it trains no further epoch."""
        for m in self.members:
            if m.index == index:
                m.stopped = True

    def _drop_stopped(self) -> None:
        keep = [k for k, m in enumerate(self.members) if not m.stopped]
        if len(keep) == len(self.members):
            return
        gone = {m.index for m in self.members if m.stopped}
        for p in (p for index, ps, _ in self._sets if index in gone for p in ps):
            self.optimizer.state.pop(p, None)
        self._sets = [entry for entry in self._sets if entry[0] not in gone]
        self._regroup({m.index: 0.0 for m in self.members if not m.stopped})  # the next epoch sets the rates
        self.members = [self.members[k] for k in keep]
        self.models.keep(keep)
        self.losses.keep(keep)

    def _set_lr(self, epoch: int) -> list[float]:
        lrs = []
        for k, m in enumerate(self.members):
            s = m.spec
            factor = 1.0
            if epoch < s.warmup_epochs:
                factor = (epoch + 1) / s.warmup_epochs
            elif s.lr_schedule == "cosine":
                span = max(1, s.epochs - s.warmup_epochs)
                factor = 0.5 * (1.0 + math.cos(math.pi * (epoch - s.warmup_epochs) / span))
            lrs.append(self.losses.lr(k, s.lr) * factor)
        self._regroup({m.index: lr for m, lr in zip(self.members, lrs, strict=True)})
        return lrs

    def _regroup(self, lr_of: dict[int, float]) -> None:
        """One optimizer group per distinct (learning rate, weight decay) among the members, so fused
        AdamW runs once per group rather than once per member; every parameter's update is the same."""
        keyed: dict[tuple[float, float], list[int]] = {}
        for i, (index, _, wd) in enumerate(self._sets):
            keyed.setdefault((lr_of[index], wd), []).append(i)
        grouping = tuple(tuple(v) for v in keyed.values())
        if grouping == self._grouping:
            for group, (lr, _) in zip(self.optimizer.param_groups, keyed, strict=True):
                group["lr"] = lr
            return
        defaults = self.optimizer.defaults
        self.optimizer.param_groups = [
            {**defaults, "params": [p for i in sets for p in self._sets[i][1]], "lr": lr, "weight_decay": wd}
            for (lr, wd), sets in keyed.items()]
        self._grouping = grouping

    # ---------------------------------------------------------------- training

    def _train_epoch(self) -> dict[str, list[float]]:
        s = self.spec
        members = self.members
        self.models.train()
        data = self.train
        eff = s.effective_batch_size
        steps = len(data) // eff
        perms = torch.stack([torch.randperm(len(data), generator=m.generator) for m in members]).to(self.device)
        xs, ys = data.pocket[perms], data.ligand[perms]  # [K, N, D]
        masking = any(self.losses.masks(k) for k in range(len(members)))
        contrastive = any(self.losses.contrastive(k) for k in range(len(members)))
        ids_all = data.ligand_id[perms] if masking else None
        losses: list[Tensor] = []
        norms: list[Tensor] = []
        components: dict[str, list[Tensor]] = {}
        pending: list[Tensor] = []
        correct = torch.zeros(len(members), device=self.device)
        for step in range(steps):
            lo, hi = step * eff, (step + 1) * eff
            x, y = xs[:, lo:hi], ys[:, lo:hi]
            lid = None if ids_all is None else ids_all[:, lo:hi]
            if s.accumulation_steps == 1:
                with self.amp.autocast():
                    p = self.models(x)
                loss, parts = self.losses(p, y, lid)
                self._backward(loss.sum())
                reps = p.detach()
            elif contrastive:
                loss, parts, reps = self._gradcache(x, y, lid)
            else:
                loss, parts, reps = self._accumulate(x, y)
            norms.append(self._optimizer_step())
            losses.append(loss.detach())
            for name, value in parts.items():
                components.setdefault(name, []).append(value)
            pending.append(reps)
            if len(pending) == INBATCH_FLUSH or step == steps - 1:
                first = (step + 1 - len(pending)) * eff
                idx = perms[:, first:(step + 1) * eff].view(len(members), len(pending), eff).transpose(0, 1)
                correct += self._inbatch_correct(torch.stack(pending), idx)
                pending = []
        grad_norm, skipped = _mean_norm(torch.stack(norms), skip_nonfinite=self.amp.scaler is not None)
        out = {
            "train/loss": torch.stack(losses).float().mean(0),
            "train/inbatch_top1": correct / (steps * eff),
            "grad_norm": grad_norm,
        }
        if self.amp.scaler is not None:  # steps the scaler skipped after an overflow
            out["amp_skipped_steps"] = skipped
        for name, values in components.items():
            out[f"train/loss_{name}"] = torch.stack(values).float().mean(0)
        numbers: list[list[float]] = torch.stack([v.float() for v in out.values()]).tolist()
        return dict(zip(out, numbers, strict=True))

    def _backward(self, loss: Tensor) -> None:
        if self.amp.scaler is not None:
            self.amp.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> Tensor:
        """Clip each member's gradient by its own norm (never one norm across members), step, and
        return each member's total gradient norm [K] (before clipping)."""
        scaler = self.amp.scaler
        self.models.collect_grads()
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # type: ignore[arg-type]  # duck-typed: param_groups, step
        by_member = [[p.grad for p in m.params if p.grad is not None] for m in self.members]
        grads = [g for mine in by_member for g in mine]
        per_tensor = torch.stack(torch._foreach_norm(grads))
        counts = tuple(len(mine) for mine in by_member)
        if counts != self._owners[0]:  # which member each gradient belongs to, kept while it holds
            self._owners = counts, torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(
                per_tensor.device)
        total = torch.zeros(len(by_member), dtype=per_tensor.dtype, device=per_tensor.device)
        total = total.index_add_(0, self._owners[1], per_tensor.pow(2)).sqrt()
        for k, m in enumerate(self.members):
            if m.spec.grad_clip is not None and by_member[k]:
                coef = torch.clamp(m.spec.grad_clip / (total[k] + 1e-6), max=1.0)
                torch._foreach_mul_(by_member[k], coef)
        if scaler is not None:
            scaler.step(self.optimizer)  # type: ignore[arg-type]
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.models.zero_grad()
        return total

    def _accumulate(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Per-sample losses: each micro-batch's gradient, weighted by its share of the batch."""
        n = x.shape[1]
        total = torch.zeros(len(self.members), device=self.device)
        reps = []
        b = self.spec.batch_size
        for xc, yc in zip(x.split(b, dim=1), y.split(b, dim=1), strict=True):
            with self.amp.autocast():
                p = self.models(xc)
            part = self.losses(p, yc)[0] * (xc.shape[1] / n)
            self._backward(part.sum())
            total = total + part.detach()
            reps.append(p.detach())
        return total, {}, torch.cat(reps, dim=1)

    def _gradcache(self, x: Tensor, y: Tensor, lid: Tensor | None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        seen: dict[str, Any] = {}

        def total(pred: Tensor, target: Tensor, ids: Tensor | None) -> Tensor:
            seen["loss"], seen["parts"] = self.losses(pred, target, ids)
            return seen["loss"].sum()

        _, reps = grad_cache(self.models, total, x, y, lid, self.spec.batch_size, dim=1,
                             autocast=self.amp.autocast, backward=self._backward,
                             generators=[m.noise for m in self.members])
        return seen["loss"].detach(), seen["parts"], reps

    def _inbatch_correct(self, reps: Tensor, idx: Tensor) -> Tensor:
        """Per member, how many rows rank their own ligand first among their batch (ties count as misses).

        ``reps`` [..., K, B, D] and ``idx`` [..., K, B] (the rows' indices in the training set).
        """
        r = reps.float()
        sims = r @ self.train_unit[idx].float().transpose(-1, -2)  # [..., K, B, B]; row norms do not matter
        ids = self.train.ligand_id[idx]
        same = ids[..., :, None] == ids[..., None, :]
        pos = sims.masked_fill(~same, float("-inf")).amax(-1)
        neg = sims.masked_fill(same, float("-inf")).amax(-1)
        hits = (pos > neg).float()
        return hits.sum(-1).reshape(-1, hits.shape[-2]).sum(0)

    # ---------------------------------------------------------------- validation

    @torch.no_grad()
    def predict(self, pocket: Tensor, chunk: int = 8192) -> Tensor:
        """The (first) run's ligand-space embeddings for pocket features (eval mode, float32 or wider)."""
        return _embed(self.model, pocket.to(self.device), chunk, self.amp.autocast)

    @torch.no_grad()
    def predict_members(self, pocket: Tensor, chunk: int = 8192) -> Tensor:
        """Every training member's embeddings for the same pocket features: [K, N, D] (eval mode, float32 or wider)."""
        self.models.eval()
        x = pocket.to(self.device)
        outs = []
        for xc in x.split(chunk):
            with self.amp.autocast():
                outs.append(_widen(self.models(xc.expand(len(self.members), -1, -1))))
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def _validate(self) -> list[dict[str, float]]:
        out, self.floors = self._score(self.predict_members(self.val.pocket), self.val, self.losses, "val")
        return out

    @torch.no_grad()
    def _score(self, pred: Tensor, data: PairedEmbeddings, losses: MemberLosses, split: str
               ) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Each member's metrics ``split/...`` for its embeddings ``pred`` [K, N, D] of ``data``, and what a random
        ranking scores on ``data`` (``split/ef1`` -> 1.0, ...)."""
        k_members = pred.shape[0]
        target = data.ligand.expand(k_members, -1, -1)
        ids = data.ligand_id.expand(k_members, -1)
        n_batches = max(1, math.ceil(len(data) / self.spec.effective_batch_size))
        batched = [k for k in range(k_members) if losses.contrastive(k)] if n_batches > 1 else []
        # a loss over the whole set for the members whose loss is per sample; a contrastive one is taken
        # over batches of the training size
        vloss = losses(pred, target, ids)[0].tolist() if len(batched) < k_members else [0.0] * k_members
        if batched:
            total = torch.zeros(k_members, dtype=pred.dtype, device=self.device)
            for part in torch.arange(len(data), device=self.device).tensor_split(n_batches):
                total += losses(pred[:, part], target[:, part], ids[:, part])[0] * part.numel()
            chunked = (total / len(data)).tolist()
            for k in batched:
                vloss[k] = chunked[k]
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

    # ---------------------------------------------------------------- the selected model

    def selected_model(self, index: int = 0) -> SelectedModel | None:
        """Run ``index``'s model at its selected epoch, on the trainer's device in eval mode, taking pocket rows of
        any float dtype (None before a finite selection metric). A copy: training goes on without touching it."""
        m = self.every[index]
        if m.best.state is None:
            return None
        with torch.random.fork_rng(devices=[]):  # its fresh initialisation leaves torch's stream as it was
            model = build_model(m.spec.model, self.train.pocket_dim, self.train.ligand_dim)
        model.to(self.device, self.dtype).load_state_dict(m.best.state)
        return SelectedModel(model).eval()

    @torch.no_grad()
    def score_test(self, index: int = 0, model: SelectedModel | None = None
                   ) -> tuple[dict[str, float], dict[str, float]]:
        """Run ``index``'s selected model (``selected_model``, or the one given) scored once on the test pairs: its
        ``test/...`` metrics (empty without a selected epoch or test pairs) and what a random ranking scores there.
        The loss is the run's at the selected epoch (its stage, its learnable temperature then). The model runs as
        it is logged: without autocast, so the logged model reproduces these numbers."""
        model = model if model is not None else self.selected_model(index)
        if model is None or self.test is None or len(self.test) == 0:
            return {}, {}
        m = self.every[index]
        criterion = loss_registry.build(m.spec).to(self.device, self.dtype)
        if m.best.criterion_state is not None:
            criterion.load_state_dict(m.best.criterion_state)
        losses = _member_losses([criterion], [m.spec])
        losses.set_epoch(m.best.epoch)
        pred = _embed(model, self.test.pocket, 8192, contextlib.nullcontext)
        (metrics,), floors = self._score(pred[None], self.test, losses, "test")
        return metrics, floors

    # ---------------------------------------------------------------- checkpoints

    def checkpoint(self, index: int, epoch: int) -> dict[str, Any]:
        """Everything member ``index`` needs to continue after ``epoch`` exactly as if never stopped: model,
        optimizer and loss state (a learnable temperature), batch order and random state, best epoch."""
        m = self.every[index]
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": _cloned(m.model.state_dict()),
            "criterion": _cloned(m.criterion.state_dict()),
            "optimizer": [_cloned(self.optimizer.state.get(p, {})) for p in m.params],
            "generator": m.generator.get_state(),
            "noise": m.noise.get_state(),
            "noise_device": self.device.type,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "best": m.best.document(),
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler is not None else None,
        }

    def restore(self, index: int, state: dict[str, Any]) -> None:
        """Continue member ``index`` from a checkpoint: training resumes at the epoch after the checkpoint's."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        m = self.every[index]
        m.model.load_state_dict(state["model"])
        m.criterion.load_state_dict(state["criterion"])
        for p, saved in zip(m.params, state["optimizer"], strict=True):
            if saved:
                # copies: training must not change the caller's checkpoint
                self.optimizer.state[p] = {k: v.to(p.device, copy=True) if isinstance(v, Tensor) else v
                                           for k, v in saved.items()}
        m.generator.set_state(state["generator"])
        if state.get("noise_device") == self.device.type:
            m.noise.set_state(state["noise"])
        else:  # saved on another kind of device (or before runs had a dropout stream): a fresh stream per epoch
            m.noise.manual_seed((m.spec.seed ^ _NOISE_SEED) + int(state["epoch"]) + 1)
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        m.best.load(state["best"])
        if state.get("scaler") is not None and self.amp.scaler is not None:
            self.amp.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1

    # ---------------------------------------------------------------- results

    def save_best(self, path: str | Path, index: int = 0) -> Path:
        """Write a run's selected epoch's model state (state_dict) to a file: whole or not at all (through a
        temporary file beside it), and a failed write (a full disk) as one AblateError."""
        state = self.every[index].best.state
        if state is None:
            raise AblateError("no selected model to save: no epoch produced a finite selection metric")
        out = Path(path)
        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in state.items()}, buffer)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists() and not out.is_file():  # a device or a pipe is written as it is
                out.write_bytes(buffer.getvalue())
                return out
            partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
            try:
                partial.write_bytes(buffer.getvalue())
                os.replace(partial, out)
            finally:
                partial.unlink(missing_ok=True)
        except OSError as e:
            raise AblateError(f"could not write the selected model to {out}: {e.strerror or e}") from None
        return out



_ALWAYS = frozenset({"train/loss", "train/inbatch_top1", "grad_norm", "amp_skipped_steps"})
"""Per-member train metrics kept even when not finite (a divergence is seen in them); the loss parts
of members whose loss has none are NaN and left out."""


CHECKPOINT_FORMAT = 2

_NOISE_SEED = 0x5DEECE66D
"""Mixed into a run's seed for its dropout stream, which then differs from its batch-order stream."""


def _member_losses(criteria: list[nn.Module], runs: Sequence[RunSpec]) -> MemberLosses:
    """The members' losses on the member axis; a loss that is not built in is watched (see ``MemberLosses``)."""
    definitions = [loss_registry.resolve(s.loss) for s in runs]
    return MemberLosses(criteria, [s.mask_shared_ligands for s in runs], [s.loss for s in runs],
                        [not d.builtin for d in definitions])


def _kept(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of a state dict, where it is (device and dtype), that training can no longer change."""
    return {k: v.detach().clone() for k, v in state.items()}


def _cloned(state: Any) -> Any:
    """A copy of a state dict (tensors cloned, on the CPU) that training can no longer change."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v for k, v in state.items()}


def _embed(model: nn.Module, pocket: Tensor, chunk: int, context: Callable[[], AbstractContextManager[Any]]
           ) -> Tensor:
    """A model's embeddings of pocket rows, in chunks, in eval mode and ``context`` (autocast or none), widened."""
    model.eval()
    outs = []
    for xc in pocket.split(chunk):
        with context():
            outs.append(_widen(model(xc)))
    return torch.cat(outs)


def _widen(x: Tensor) -> Tensor:
    """Half precision -> float32; float32 and float64 stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _to(data: PairedEmbeddings, device: torch.device, dtype: torch.dtype | None) -> PairedEmbeddings:
    moved = data.to(device)
    if dtype is None:
        return moved
    return PairedEmbeddings(moved.pocket.to(dtype), moved.ligand.to(dtype), moved.ligand_id, moved.pocket_id)


def _mean_norm(per_step: Tensor, skip_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    """Each member's mean over steps of its total gradient norm ([steps, K] -> [K]), and the number
    of steps left out as non-finite (with ``skip_nonfinite``: the steps a float16 grad scaler
    skipped after an overflow, which are not a divergence)."""
    if not skip_nonfinite:
        return per_step.mean(0), torch.zeros(per_step.shape[1])
    finite = torch.isfinite(per_step)
    kept = torch.where(finite, per_step, torch.zeros_like(per_step)).sum(0)
    count = finite.sum(0)
    mean = torch.where(count > 0, kept / count.clamp(min=1), torch.full_like(kept, float("nan")))
    return mean, (~finite).sum(0).float()


def time_steps(specs: Sequence[RunSpec], train: PairedEmbeddings, val: PairedEmbeddings, steps: int = 6) -> float:
    """Seconds per optimizer step of an array of ``specs`` (one warm-up step first), for planning."""
    trainer = Trainer(specs, train, val)
    trainer.losses.set_epoch(0)
    trainer._set_lr(0)
    trainer.models.train()
    eff = trainer.spec.effective_batch_size
    n = min(len(trainer.train) // eff, steps + 1)
    k = len(specs)
    idx = torch.arange(n * eff, device=trainer.device).expand(k, -1)
    x, y = trainer.train.pocket[idx], trainer.train.ligand[idx]
    lid = trainer.train.ligand_id[idx]
    contrastive = any(trainer.losses.contrastive(m) for m in range(k))
    start = time.perf_counter()
    for step in range(n):
        if step == 1:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            start = time.perf_counter()
        window = slice(step * eff, (step + 1) * eff)
        xb, yb, ib = x[:, window], y[:, window], lid[:, window]
        if trainer.spec.accumulation_steps > 1 and contrastive:
            trainer._gradcache(xb, yb, ib)
        else:
            with trainer.amp.autocast():
                p = trainer.models(xb)
            trainer._backward(trainer.losses(p, yb, ib)[0].sum())
        trainer._optimizer_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return (time.perf_counter() - start) / max(1, n - 1)
