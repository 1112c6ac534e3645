"""ablate: loss ablations and hyper-parameter searches for pocket -> ligand embedding alignment.

The library API (losses, metrics, data) is importable from here; submodules load on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AblateError": "ablate.errors",
    "CombinedLoss": "ablate.losses.combined",
    "CosineSimilarityLoss": "ablate.losses.cosine",
    "InfoNCELoss": "ablate.losses.infonce",
    "MSELoss": "ablate.losses.mse",
    "MultiStageScheduler": "ablate.losses.multistage",
    "SigLIPLoss": "ablate.losses.siglip",
    "SupervisedContrastiveLoss": "ablate.losses.supcon",
    "build_loss": "ablate.losses",
    "compute_retrieval_metrics": "ablate.metrics",
    "PairedEmbeddings": "ablate.training.data",
    "load_pairs": "ablate.training.data",
    "split": "ablate.training.splits",
    "synthetic_pairs": "ablate.training.data",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ablate.errors import AblateError
    from ablate.losses import build_loss
    from ablate.losses.combined import CombinedLoss
    from ablate.losses.cosine import CosineSimilarityLoss
    from ablate.losses.infonce import InfoNCELoss
    from ablate.losses.mse import MSELoss
    from ablate.losses.multistage import MultiStageScheduler
    from ablate.losses.siglip import SigLIPLoss
    from ablate.losses.supcon import SupervisedContrastiveLoss
    from ablate.metrics import compute_retrieval_metrics
    from ablate.training.data import PairedEmbeddings, load_pairs, synthetic_pairs
    from ablate.training.splits import split


_MOVED = {"ablate.models": "ablate.training.models"}
"""Modules that moved, by their old names: models logged to MLflow pickle their classes by module path."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved module's old name as the module itself (an unpickled model finds its class)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for an old module name, else None."""
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in _MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """The module under its new name."""
        return importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is already imported."""


sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ablate' has no attribute {name!r}")
