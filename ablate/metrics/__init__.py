"""Retrieval, embedding-quality and virtual-screening metrics: pure functions on tensors.

Ranks break ties pessimistically everywhere: a constant model scores at chance or worse, never
perfectly. Nothing holds a whole similarity matrix: scores are computed in chunks of rows.
"""

from ablate.metrics.retrieval import (
    CHUNK_ELEMENTS,
    alignment,
    compute_retrieval_metrics,
    mean_cosine,
    ranks,
    retrieval_by_member,
    spread,
    uniformity,
)
from ablate.metrics.screening import (
    BEDROC_ALPHA,
    SCREENING_FRACTIONS,
    compute_screening_metrics,
    random_screening,
    screening,
    screening_by_member,
)

__all__ = [
    "BEDROC_ALPHA",
    "CHUNK_ELEMENTS",
    "SCREENING_FRACTIONS",
    "alignment",
    "compute_retrieval_metrics",
    "compute_screening_metrics",
    "mean_cosine",
    "random_screening",
    "ranks",
    "retrieval_by_member",
    "screening",
    "screening_by_member",
    "spread",
    "uniformity",
]
