"""The losses of K runs trained side by side (an array), evaluated on ``[K, B, D]`` outputs.

Members are grouped by the loss they use this epoch. A loss class that says how it runs on the
member axis (a ``stack`` class method) is evaluated once per group with its own formula; any other
loss (a user's) runs under ``torch.func.vmap`` when its members differ only in tensors, else one
member at a time. A member's value always equals its loss's ``forward`` on its own outputs.

A loss that is not built in is watched: if it raises, returns something other than a finite
scalar (for finite inputs) or a value without a gradient, that member is marked failed (``failed``)
with a one-line reason, contributes nothing from then on, and the other members go on untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Stacked = Callable[[Tensor, Tensor, "Tensor | None"], "tuple[Tensor, dict[str, Tensor]]"]
"""A loss on the member axis: (pred [K, B, D], target [K, B, D], ligand ids [K, B] or None) ->
(each member's loss [K], the unweighted parts it logs {name: [K]})."""


class MemberLosses(nn.Module):
    """Each member's criterion (as the registry builds it) and, per epoch, the loss it uses then.

    ``names`` are the members' loss names (for messages); ``watched`` marks the members whose loss
    is not built in (checked on every call, see the module's docstring).
    """

    def __init__(self, criteria: Sequence[nn.Module], mask_shared_ligands: Sequence[bool],
                 names: Sequence[str] | None = None, watched: Sequence[bool] | None = None):
        super().__init__()
        self.criteria = nn.ModuleList(criteria)
        self.masking = list(mask_shared_ligands)
        self.names = list(names) if names is not None else [type(c).__name__ for c in criteria]
        self.watched = list(watched) if watched is not None else [False] * len(criteria)
        self.current: list[nn.Module] = list(criteria)
        self.stages: list[str | None] = [None] * len(criteria)
        self.failed: list[str | None] = [None] * len(criteria)
        """Why each member's loss failed (None while it works)."""
        self._groups: list[_Group] | None = None
        self._order: Tensor | None = None

    def set_epoch(self, epoch: int) -> list[str | None]:
        """Switch each member to its loss for ``epoch``; returns each member's stage name (None without stages)."""
        for k, criterion in enumerate(self.criteria):
            get_loss = getattr(criterion, "get_loss", None)
            if get_loss is not None:
                self.current[k], self.stages[k] = get_loss(epoch)
        self._groups = None
        return list(self.stages)

    def keep(self, members: list[int]) -> None:
        """Drop every member not listed (members stopped early)."""
        self.criteria = nn.ModuleList([self.criteria[k] for k in members])
        for name in ("masking", "names", "watched", "current", "stages", "failed"):
            setattr(self, name, [getattr(self, name)[k] for k in members])
        self._groups = None

    def contrastive(self, k: int) -> bool:
        """Whether member k's loss this epoch depends on the rest of its batch (a user's loss: assumed so)."""
        return bool(getattr(self.current[k], "contrastive", True))

    def masks(self, k: int) -> bool:
        """Whether member k's batches need ligand ids (a contrastive loss that masks shared ligands)."""
        return self.masking[k] and self.contrastive(k)

    def lr(self, k: int, base: float) -> float:
        """Member k's base learning rate this epoch: its schedule's stage rate, else ``base``."""
        recommended = getattr(self.criteria[k], "get_recommended_lr", None)
        return float(recommended()) if recommended is not None else base

    def logged(self, k: int) -> dict[str, float]:
        """What member k's loss logs per epoch besides its value (a learnable temperature, a learned scale)."""
        logged = getattr(self.current[k], "logged", None)
        return dict(logged()) if logged is not None else {}

    def forward(self, pred: Tensor, target: Tensor, ligand_ids: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Each member's loss [K] and the parts [K] that members' losses log (NaN for the others)."""
        if self._groups is None:
            self._groups = self._group()
            order = [k for g in self._groups for k in g.members]
            self._order = None if order == sorted(order) else torch.tensor(
                sorted(range(len(order)), key=order.__getitem__))
        values = []
        parts: dict[str, Tensor] = {}
        for group in self._groups:
            take = group.take(pred.device)
            ids = None if ligand_ids is None or not group.masks else ligand_ids[take]
            value, comps = group(self, pred[take], target[take], ids)
            values.append(value)
            for name, v in comps.items():
                if name not in parts:
                    parts[name] = torch.full((len(self.current),), float("nan"), dtype=v.dtype, device=v.device)
                parts[name][take] = v.to(parts[name].dtype)
        loss = values[0] if len(values) == 1 else torch.cat(values)
        if self._order is not None:  # the groups' members are not in member order: put them back
            loss = loss[self._order.to(loss.device)]
        return loss, parts

    def _group(self) -> list[_Group]:
        """The members by the loss class they use this epoch (and by masking, and for losses without a
        member-axis form by their settings, so that a vmapped group shares everything but tensors)."""
        keyed: dict[Any, list[int]] = {}
        for k, c in enumerate(self.current):
            stack = getattr(type(c), "stack", None)
            key = (type(c), self.masks(k), None if stack is not None else _settings(c))
            keyed.setdefault(key, []).append(k)
        return [_Group(self, members) for members in keyed.values()]


def _settings(module: nn.Module) -> str:
    """What a module holds besides tensors (its constructor's numbers and flags), as a comparable string."""
    plain = {k: v for k, v in vars(module).items() if not k.startswith("_") and not isinstance(v, Tensor)}
    return repr(sorted(plain.items(), key=lambda kv: kv[0])) + "".join(
        _settings(child) for child in module.children())


class _Group:
    """Members that use one loss class this epoch, and how they are evaluated together."""

    def __init__(self, owner: MemberLosses, members: list[int]):
        self.members = members
        first, last = members[0], members[-1]
        self._slice = slice(first, last + 1) if members == list(range(first, last + 1)) else None
        self._index: dict[torch.device, Tensor] = {}
        self.criteria = [owner.current[k] for k in members]
        self.masks = owner.masks(members[0])
        self.watched = any(owner.watched[k] for k in members)
        cls = type(self.criteria[0])
        self.components: tuple[str, ...] = tuple(getattr(cls, "components", ()))
        stack = getattr(cls, "stack", None)
        # vmap calls one member's forward with every member's tensors: right only for a loss that keeps no state of
        # its own (it says so: ``functional = True``) and logs no parts; any other runs one member at a time
        functional = bool(getattr(cls, "functional", False)) and not self.components
        self.mode = "stack" if stack is not None else "vmap" if functional else "loop"
        self.stacked: Stacked | None = stack(self.criteria) if stack is not None else None

    def take(self, device: torch.device) -> slice | Tensor:
        """How to take the group's members from a [K, ...] tensor: a slice (a view) when they are consecutive."""
        if self._slice is not None:
            return self._slice
        if device not in self._index:
            self._index[device] = torch.tensor(self.members, device=device)
        return self._index[device]

    def __call__(self, owner: MemberLosses, pred: Tensor, target: Tensor, ids: Tensor | None
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.watched:  # a built-in loss: its own member-axis form, or vmap, or one member at a time
            if self.stacked is not None:
                return self.stacked(pred, target, ids)
            if self.mode == "vmap":
                try:
                    return _vmapped(self.criteria, pred, target, ids), {}
                except Exception:
                    self.mode = "loop"
            return self._loop(owner, pred, target, ids)
        if self.mode != "loop" and not any(owner.failed[k] for k in self.members):
            try:
                value, comps = self.stacked(pred, target, ids) if self.stacked is not None else (
                    _vmapped(self.criteria, pred, target, ids), {})
                if not _problems(value, pred, (len(self.members),)):
                    return value, comps
            except Exception:
                pass
            self.mode = "loop"  # vmap cannot run this loss, or a member misbehaved: one at a time from now on
        return self._loop(owner, pred, target, ids)

    def _loop(self, owner: MemberLosses, pred: Tensor, target: Tensor, ids: Tensor | None
              ) -> tuple[Tensor, dict[str, Tensor]]:
        values: list[Tensor] = []
        comps: dict[str, list[Tensor]] = {}
        for j, (k, criterion) in enumerate(zip(self.members, self.criteria, strict=True)):
            value = None
            if owner.failed[k] is None:
                try:
                    value = criterion(pred[j], target[j], None if ids is None else ids[j])
                except Exception as e:  # a user's loss fails its member, the others go on; a built-in's is a bug
                    if not owner.watched[k]:
                        raise
                    owner.failed[k] = f"loss {owner.names[k]!r} raised {type(e).__name__}: {e}".splitlines()[0]
                else:
                    problem = _problems(value, pred[j], ()) if owner.watched[k] else None
                    if problem:
                        owner.failed[k] = f"loss {owner.names[k]!r} {problem}"
                        value = None
            if value is None:  # a failed member adds nothing (and gets no gradient) until the epoch ends
                value = (pred[j] * 0.0).sum().to(torch.promote_types(pred.dtype, torch.float32))
            values.append(value.reshape(()))
            last = getattr(criterion, "last_components", {})
            for name in self.components:
                if name in last:
                    comps.setdefault(name, []).append(last[name])
        out = {name: torch.stack(v) for name, v in comps.items() if len(v) == len(values)}
        return torch.stack(values), out


def _vmapped(criteria: list[nn.Module], pred: Tensor, target: Tensor, ids: Tensor | None) -> Tensor:
    """The members' losses under ``torch.func.vmap``: their parameters and buffers stacked (in the graph)."""
    from torch.func import functional_call, vmap

    base = criteria[0]
    tensors = {name: torch.stack([dict(c.named_parameters())[name] for c in criteria])
               for name, _ in base.named_parameters()}
    tensors.update({name: torch.stack([dict(c.named_buffers())[name] for c in criteria])
                    for name, _ in base.named_buffers()})

    def one(state: dict[str, Tensor], p: Tensor, t: Tensor, i: Tensor | None) -> Tensor:
        return functional_call(base, state, (p, t) if i is None else (p, t, i))

    return vmap(one, in_dims=(0, 0, 0, None if ids is None else 0))(tensors, pred, target, ids)


def _problems(value: Any, pred: Tensor, shape: tuple[int, ...]) -> str | None:
    """What is wrong with loss values for ``pred`` (None when they are finite, of ``shape``, with a gradient).

    One member's value may also be of shape [1]."""
    if not isinstance(value, Tensor):
        return f"returned {type(value).__name__}, not a tensor"
    if tuple(value.shape) != shape and not (shape == () and value.numel() == 1):
        return f"returned a tensor of shape {list(value.shape)}, not a scalar"
    if torch.is_grad_enabled() and pred.requires_grad and not value.requires_grad:
        return "returned a value without a gradient (detached, or computed outside autograd)"
    finite_inputs = torch.isfinite(pred).reshape(value.numel(), -1).all(1)
    if bool((~torch.isfinite(value.detach().reshape(-1)) & finite_inputs).any()):
        return "returned NaN or inf on finite inputs"
    return None
