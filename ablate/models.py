"""Models that map pocket features to the ligand embedding space."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ablate.errors import AblateError
from ablate.specs import ModelSpec


class ProjectionHead(nn.Module):
    """An MLP: (Linear -> GELU -> Dropout) per hidden width, then a Linear to the output width."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (256,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Pocket features [B, in_dim] -> predicted ligand embeddings [B, out_dim]."""
        out: Tensor = self.net(x)
        return out


def build_model(spec: ModelSpec, in_dim: int, out_dim: int) -> nn.Module:
    """The built-in head for ``factory = "mlp"``, else ``factory(in_dim, out_dim, **kwargs)``."""
    if spec.factory == "mlp":
        return ProjectionHead(in_dim, out_dim, spec.hidden, spec.dropout, **spec.kwargs)
    module_name, _, attr = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AblateError(
            f"model factory {spec.factory!r}: cannot import {module_name!r} ({e}); "
            "is the package installed or on PYTHONPATH?"
        ) from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise AblateError(f"model factory {spec.factory!r}: {module_name!r} has no {attr!r}")
    model = factory(in_dim, out_dim, **spec.kwargs)
    if not isinstance(model, nn.Module):
        raise AblateError(
            f"model factory {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
