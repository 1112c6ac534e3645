"""Models that map pocket features to the ligand embedding space, alone or as members trained together."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.errors import AblateError
from ablate.specs import ModelSpec, RunSpec


class Dropout(nn.Dropout):
    """``nn.Dropout`` that draws its masks from ``generator`` when one is set (the trainer gives each run its
    own stream, so a run's masks do not depend on what else trains in the process); else from torch's."""

    generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x, with each element zeroed with probability p and the rest scaled by 1 / (1 - p) in training."""
        if self.generator is None or not self.training or self.p == 0:
            return super().forward(x)
        return x * dropout_mask(x.shape, self.p, self.generator, x)


def dropout_mask(shape: Sequence[int], p: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """Keep-mask / (1 - p) of ``shape`` in ``like``'s dtype, drawn from ``generator`` in float32 or wider (so
    a half-precision model keeps elements with probability 1 - p, not a rounded one)."""
    wide = torch.promote_types(like.dtype, torch.float32)
    mask = torch.empty(shape, dtype=wide, device=like.device).bernoulli_(1 - p, generator=generator)
    return mask.div_(1 - p).to(like.dtype)


class ProjectionHead(nn.Module):
    """An MLP: (Linear -> GELU -> Dropout) per hidden width, then a Linear to the output width."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (256,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            if dropout > 0:
                layers.append(Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Pocket features [B, in_dim] -> predicted ligand embeddings [B, out_dim]."""
        out: Tensor = self.net(x)
        return out


class SelectedModel(nn.Module):
    """A run's model as it is logged: the data file's raw pocket rows in (any float dtype, cast to the model's),
    ligand-space embeddings out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pocket: Tensor) -> Tensor:
        """Pocket features [N, Dp] -> predicted ligand embeddings [N, Dl]."""
        weight = next(self.model.parameters(), None)
        if weight is not None and pocket.is_floating_point() and pocket.dtype != weight.dtype:
            pocket = pocket.to(weight.dtype)
        out: Tensor = self.model(pocket)
        return out


def head_parameters(spec: ModelSpec, in_dim: int, out_dim: int) -> int | None:
    """How many parameters the built-in head has (None for a user's model factory), without building it."""
    if spec.factory != "mlp":
        return None
    widths = [in_dim, *spec.hidden, out_dim]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def training_bytes(run: RunSpec, in_dim: int, out_dim: int) -> int:
    """About what one run needs in float32: parameters, gradients and two optimizer moments, and a batch's
    activations (a user's model is built to count its parameters)."""
    params = head_parameters(run.model, in_dim, out_dim)
    if params is None:
        with torch.random.fork_rng(devices=[]):
            params = sum(p.numel() for p in build_model(run.model, in_dim, out_dim).parameters())
    widths = [in_dim, *run.model.hidden, out_dim]
    activations = run.effective_batch_size * (sum(widths) * 3 + run.effective_batch_size)
    return 4 * (4 * params + activations)


def check_size(run: RunSpec, in_dim: int, out_dim: int, free: int) -> None:
    """Refuse, in one line, a run that cannot fit in ``free`` bytes (before anything is allocated)."""
    need = training_bytes(run, in_dim, out_dim)
    if need > free:
        params = head_parameters(run.model, in_dim, out_dim)
        shape = f" ({params:.3g} parameters)" if params is not None else ""
        raise AblateError(
            f"model.hidden {list(run.model.hidden)}: a {in_dim} -> {out_dim} model{shape} needs about "
            f"{_gib(need)} to train, and {_gib(free)} is free; use smaller hidden widths")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def build_model(spec: ModelSpec, in_dim: int, out_dim: int) -> nn.Module:
    """The built-in head for ``factory = "mlp"``, else ``factory(in_dim, out_dim, **kwargs)``."""
    if spec.factory == "mlp":
        if spec.kwargs:
            raise AblateError(
                f"model.kwargs: the built-in head (model.factory = \"mlp\") takes no keyword arguments, got "
                f"{', '.join(map(repr, spec.kwargs))}; set its shape with model.hidden and model.dropout, or give "
                "model.factory = \"package.module:factory\" for a model that takes them")
        return ProjectionHead(in_dim, out_dim, spec.hidden, spec.dropout)
    factory = _import_factory(spec.factory)
    shown = ", ".join([str(in_dim), str(out_dim), *(f"{k}={v!r}" for k, v in spec.kwargs.items())])
    try:
        model = factory(in_dim, out_dim, **spec.kwargs)
    except AblateError:
        raise
    except Exception as e:
        raise AblateError(
            f"model factory {spec.factory!r} failed when called as {spec.factory}({shown}): "
            f"{type(e).__name__}: {_first_line(e)}; a factory takes (in_dim, out_dim, **model.kwargs) "
            "and returns a torch.nn.Module"
        ) from None
    if not isinstance(model, nn.Module):
        raise AblateError(
            f"model factory {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _import_factory(path: str) -> Any:
    """The callable that an import path "package.module:factory" names; an AblateError otherwise."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AblateError(
            f"model factory {path!r}: cannot import {module_name!r} ({e}); "
            "is the package installed or on PYTHONPATH?"
        ) from None
    except Exception as e:
        raise AblateError(
            f"model factory {path!r}: importing {module_name!r} failed: {type(e).__name__}: {_first_line(e)}"
        ) from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise AblateError(f"model factory {path!r}: {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise AblateError(f"model factory {path!r} is a {type(factory).__name__}, not a function or class; "
                          "name a callable that takes (in_dim, out_dim, **model.kwargs)")
    return factory


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


# --------------------------------------------------------------------------------------
# Members: K models of one architecture, evaluated together
# --------------------------------------------------------------------------------------

Fusion = Literal["loop", "stacked", "vmap"]


class MemberModels:
    """K models of one architecture: [K, B, Din] -> [K, B, Dout], each member on its own slice.

    Every member keeps its own module (its parameters are its own leaves, so optimizer, clipping
    and checkpoints stay per member). How they run together:

    - ``stacked``: the built-in MLP as batched matrix products (``baddbmm``). Each layer's weights
      and biases live in one [K, ...] tensor that the members' parameters are views of, so a
      forward pass copies nothing and backward writes one gradient per layer, which
      ``collect_grads`` hands to the members as views (the optimizer updates the members'
      parameters, and so the stacked tensors, in place);
    - ``vmap``: any module through ``torch.func.functional_call`` under ``vmap`` (dropout draws
      differ per member, ``randomness="different"``);
    - ``loop``: one member after another (K = 1, or a model that cannot be vmapped).
    """

    def __init__(self, modules: list[nn.Module], fusion: Fusion | None = None):
        self.modules = modules
        self.fusion: Fusion = fusion or self._choose()
        if self.fusion == "stacked" and not all(isinstance(m, ProjectionHead) for m in modules):
            raise ValueError("stacked fusion is for the built-in head (ProjectionHead); use vmap for other models")
        self._stacks: list[tuple[list[nn.Linear], Tensor, Tensor]] = []
        """Per Linear layer of the stacked MLP: the members' layers, the stacked weights and biases."""
        self._stack()

    def _stack(self) -> None:
        """Move the members' Linear parameters into stacked [K, ...] tensors they are views of."""
        self._stacks = []
        if self.fusion != "stacked" or not self.modules:
            return
        template = self.modules[0]
        assert isinstance(template, ProjectionHead)
        for i, layer in enumerate(template.net):
            if isinstance(layer, nn.Linear):
                linears = [_layer(m, i) for m in self.modules]
                w = torch.stack([lin.weight.detach() for lin in linears]).requires_grad_(True)
                b = torch.stack([lin.bias.detach() for lin in linears]).requires_grad_(True)
                for k, lin in enumerate(linears):
                    lin.weight.data = w.detach()[k]
                    lin.bias.data = b.detach()[k]
                self._stacks.append((linears, w, b))

    def collect_grads(self) -> None:
        """Give each member's parameters their slice of the stacked gradients (after backward)."""
        for linears, w, b in self._stacks:
            for stacked, name in ((w, "weight"), (b, "bias")):
                grad = stacked.grad
                if grad is not None:
                    for k, lin in enumerate(linears):
                        getattr(lin, name).grad = grad[k]

    def zero_grad(self) -> None:
        """Forget the stacked gradients (the members' own are the optimizer's to forget)."""
        for _, w, b in self._stacks:
            w.grad = b.grad = None

    def _choose(self) -> Fusion:
        if len(self.modules) == 1:
            return "loop"
        if all(isinstance(m, ProjectionHead) for m in self.modules):
            return "stacked"
        return "vmap"

    def __call__(self, x: Tensor) -> Tensor:
        """Each member's output for its own inputs: x[k] goes through member k."""
        if self.fusion == "stacked":
            return self._stacked(x)
        if self.fusion == "vmap":
            return self._vmapped(x)
        if len(self.modules) == 1:
            return self.modules[0](x[0]).unsqueeze(0)
        return torch.stack([m(xk) for m, xk in zip(self.modules, x.unbind(0), strict=True)])

    def _stacked(self, x: Tensor) -> Tensor:
        template = self.modules[0]
        assert isinstance(template, ProjectionHead)
        h = x
        linear = iter(self._stacks)
        for i, layer in enumerate(template.net):
            if isinstance(layer, nn.Linear):
                _, w, b = next(linear)
                h = _StackedLinear.apply(h, w.to(h.dtype), b.to(h.dtype))
            elif isinstance(layer, nn.GELU):
                h = F.gelu(h)
            elif isinstance(layer, nn.Dropout):
                h = self._dropout(h, i, layer.p, template.training)
            else:  # pragma: no cover - ProjectionHead has no other layers
                raise TypeError(f"cannot stack layer {type(layer).__name__}")
        return h

    def _dropout(self, h: Tensor, index: int, p: float, training: bool) -> Tensor:
        """Dropout of layer ``index`` on [K, B, D]: each member's mask from its own layer's generator, drawn as
        that layer draws it alone; one mask over all members where a layer has none."""
        if not training or p == 0:
            return h
        generators = [getattr(m.net[index], "generator", None) for m in self.modules]  # type: ignore[index]
        if any(g is None for g in generators):
            return F.dropout(h, p, training)
        return h * torch.stack([dropout_mask(h.shape[1:], p, cast(torch.Generator, g), h) for g in generators])

    def _vmapped(self, x: Tensor) -> Tensor:
        from torch.func import functional_call, vmap

        template = self.modules[0]
        names = [n for n, _ in template.named_parameters()]
        buffers = [n for n, _ in template.named_buffers()]
        params = {n: torch.stack([dict(m.named_parameters())[n] for m in self.modules]) for n in names}
        bufs = {n: torch.stack([dict(m.named_buffers())[n] for m in self.modules]) for n in buffers}

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xk: Tensor) -> Tensor:
            out: Tensor = functional_call(template, (p, b), (xk,))
            return out

        result: Tensor = vmap(one, randomness="different")(params, bufs, x)
        return result

    def train(self, mode: bool = True) -> None:
        """Training (or evaluation) mode for every member."""
        for m in self.modules:
            m.train(mode)

    def eval(self) -> None:
        """Evaluation mode for every member."""
        self.train(False)

    def keep(self, members: list[int]) -> None:
        """Drop every member not listed (a dropped member keeps its weights, in tensors of its own)."""
        restacked = len(members) > 1
        for linears, _, _ in self._stacks:
            for k, lin in enumerate(linears):
                if k not in members or not restacked:  # its views would keep the whole stack alive
                    lin.weight.data = lin.weight.detach().clone()
                    lin.bias.data = lin.bias.detach().clone()
        self.modules = [self.modules[k] for k in members]
        if len(self.modules) <= 1:
            self.fusion = "loop"
        self._stack()

    def check_fusion(self, x: Tensor) -> str | None:
        """Fall back to ``loop`` when the members cannot run fused on ``x``; returns why, or None."""
        if self.fusion == "loop":
            return None
        modes = [m.training for m in self.modules]
        self.eval()  # no dropout draws: the check leaves the random state as it was
        try:
            with torch.no_grad():
                fused = self(x)
                alone = torch.stack([m(xk) for m, xk in zip(self.modules, x.unbind(0), strict=True)])
            if fused.shape != alone.shape:
                raise ValueError(f"fused output {tuple(fused.shape)} != {tuple(alone.shape)}")
        except Exception as e:
            self.fusion = "loop"
            self._stacks = []
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            for m, mode in zip(self.modules, modes, strict=True):
                m.train(mode)
        return None


class _StackedLinear(torch.autograd.Function):
    """x [K, B, in] @ w[k]^T + b[k] for every member k, with w [K, out, in] and b [K, out].

    Autograd's own backward of ``baddbmm(b, x, w.transpose(1, 2))`` yields the weights' gradient
    transposed, which it then copies to lay it out as the weights are; here it is computed in that
    layout (g^T x per member), so it is kept as it is.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        out = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        ctx.save_for_backward(x.to(out.dtype), w.to(out.dtype))  # under autocast: as the product saw them
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        gb = g.sum(1) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _layer(module: nn.Module, index: int) -> nn.Linear:
    layer = module.net[index]  # type: ignore[index]
    assert isinstance(layer, nn.Linear)
    return layer
