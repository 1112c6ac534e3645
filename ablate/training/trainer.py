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
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate import losses as loss_registry
from ablate.losses._members import MemberLosses
from ablate.specs import RunSpec
from ablate.training.data import PairedEmbeddings
from ablate.training.devices import amp_for, free_bytes, resolve_device, threads_for, use_threads
from ablate.training.gradcache import grad_cache
from ablate.training.models import Dropout, Fusion, MemberModels, ProjectionHead, SelectedModel, build_model, check_size
from ablate.training.optimizer import MemberOptimizer, mean_norm
from ablate.training.preflight import check_batch, fusion_key
from ablate.training.scoring import embed, score, widen
from ablate.training.selection import Best, EpochResult, patience_over
from ablate.training.snapshots import NOISE_SEED, capture, kept, restore, write_state
from ablate.training.splits import load_split

INBATCH_FLUSH = 64
"""Steps whose representations are scored together for train/inbatch_top1."""


class Member:
    """One run of an array: its spec, model, criterion, batch order, best epoch and whether it still trains."""

    def __init__(self, index: int, spec: RunSpec, model: nn.Module, criterion: nn.Module, device: torch.device):
        self.index = index
        self.spec = spec
        self.model = model
        self.criterion = criterion
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.noise = torch.Generator(device).manual_seed(spec.seed ^ NOISE_SEED)
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
        self.updates = MemberOptimizer(self.members, lead.lr, self.device)
        self.optimizer = self.updates.adamw
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
                    member.best.state = kept(member.model.state_dict())
                    member.best.criterion_state = kept(member.criterion.state_dict())
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
        self.updates.drop(gone, [m.index for m in self.members if not m.stopped])
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
        self.updates.set_lrs({m.index: lr for m, lr in zip(self.members, lrs, strict=True)})
        return lrs

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
            loss, parts, reps, norm = self.step(x, y, lid)
            norms.append(norm)
            losses.append(loss)
            for name, value in parts.items():
                components.setdefault(name, []).append(value)
            pending.append(reps)
            if len(pending) == INBATCH_FLUSH or step == steps - 1:
                first = (step + 1 - len(pending)) * eff
                idx = perms[:, first:(step + 1) * eff].view(len(members), len(pending), eff).transpose(0, 1)
                correct += self._inbatch_correct(torch.stack(pending), idx)
                pending = []
        grad_norm, skipped = mean_norm(torch.stack(norms), skip_nonfinite=self.amp.scaler is not None)
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

    def step(self, x: Tensor, y: Tensor, ligand_ids: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """One optimizer step of every training member on its batch ``x``, ``y`` [K, B, D] (``ligand_ids`` [K, B]
        where a loss masks shared ligands): each member's loss [K], the parts its loss logs, its embeddings
        [K, B, D] (detached) and its gradient norm [K] before clipping. With accumulation, per-sample losses add up
        micro-batch gradients and contrastive ones use GradCache."""
        if self.spec.accumulation_steps == 1:
            with self.amp.autocast():
                p = self.models(x)
            loss, parts = self.losses(p, y, ligand_ids)
            self._backward(loss.sum())
            reps = p.detach()
        elif any(self.losses.contrastive(k) for k in range(len(self.members))):
            loss, parts, reps = self._gradcache(x, y, ligand_ids)
        else:
            loss, parts, reps = self._accumulate(x, y)
        return loss.detach(), parts, reps, self._optimizer_step()

    def _backward(self, loss: Tensor) -> None:
        if self.amp.scaler is not None:
            self.amp.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> Tensor:
        """Step every member (each clipped by its own norm); returns each member's gradient norm [K]."""
        self.models.collect_grads()
        norms = self.updates.step(self.members, self.amp)
        self.models.zero_grad()
        return norms

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
        return embed(self.model, pocket.to(self.device), chunk, self.amp.autocast)

    @torch.no_grad()
    def predict_members(self, pocket: Tensor, chunk: int = 8192) -> Tensor:
        """Every training member's embeddings for the same pocket features: [K, N, D] (eval mode, float32 or wider)."""
        self.models.eval()
        x = pocket.to(self.device)
        outs = []
        for xc in x.split(chunk):
            with self.amp.autocast():
                outs.append(widen(self.models(xc.expand(len(self.members), -1, -1))))
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def _validate(self) -> list[dict[str, float]]:
        out, self.floors = score(self.predict_members(self.val.pocket), self.val, self.losses, "val",
                                 self.spec.effective_batch_size)
        return out

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
        pred = embed(model, self.test.pocket, 8192, contextlib.nullcontext)
        (metrics,), floors = score(pred[None], self.test, losses, "test", self.spec.effective_batch_size)
        if losses.failed[0] is not None:  # a user's loss that failed on the test pairs has no test loss
            metrics["test/loss"] = float("nan")
        return metrics, floors

    # ---------------------------------------------------------------- checkpoints

    def checkpoint(self, index: int, epoch: int) -> dict[str, Any]:
        """Everything member ``index`` needs to continue after ``epoch`` exactly as if never stopped (``snapshots``)."""
        return capture(self.every[index], self.optimizer, self.device, self.amp, epoch)

    def restore(self, index: int, state: dict[str, Any]) -> None:
        """Continue member ``index`` from a checkpoint: training resumes at the epoch after the checkpoint's."""
        self.start_epoch = restore(self.every[index], self.optimizer, self.device, self.amp, state)

    def save_best(self, path: str | Path, index: int = 0) -> Path:
        """Write a run's selected epoch's model state (state_dict) to a file, whole or not at all."""
        return write_state(self.every[index].best.state, path)


_ALWAYS = frozenset({"train/loss", "train/inbatch_top1", "grad_norm", "amp_skipped_steps"})
"""Per-member train metrics kept even when not finite (a divergence is seen in them); the loss parts
of members whose loss has none are NaN and left out."""




def _member_losses(criteria: list[nn.Module], runs: Sequence[RunSpec]) -> MemberLosses:
    """The members' losses on the member axis; a loss that is not built in is watched (see ``MemberLosses``)."""
    definitions = [loss_registry.resolve(s.loss) for s in runs]
    return MemberLosses(criteria, [s.mask_shared_ligands for s in runs], [s.loss for s in runs],
                        [not d.builtin for d in definitions])


def _to(data: PairedEmbeddings, device: torch.device, dtype: torch.dtype | None) -> PairedEmbeddings:
    moved = data.to(device)
    if dtype is None:
        return moved
    return PairedEmbeddings(moved.pocket.to(dtype), moved.ligand.to(dtype), moved.ligand_id, moved.pocket_id)



