"""ablate: loss ablations and hyper-parameter searches for pocket -> ligand embedding alignment.

The library API (losses, metrics, data) is importable from here; submodules load on first use.
"""

from __future__ import annotations

import importlib
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
    "PairedEmbeddings": "ablate.data",
    "load_pairs": "ablate.data",
    "split": "ablate.data",
    "synthetic_pairs": "ablate.data",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ablate.data import PairedEmbeddings, load_pairs, split, synthetic_pairs
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ablate' has no attribute {name!r}")
