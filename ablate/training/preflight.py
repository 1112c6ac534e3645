"""What runs must agree on to train as one array, and the checks every run passes before it trains."""

from __future__ import annotations

import json
from collections.abc import Hashable

import torch

from ablate import losses
from ablate.errors import AblateError
from ablate.specs import SHAPING_FIELDS, RunSpec
from ablate.training.devices import free_bytes, resolve_device
from ablate.training.models import build_model, check_size
from ablate.training.splits import Split, load_split


def fusion_key(spec: RunSpec) -> Hashable:
    """What runs must share to train as one array: model, batch size, accumulation, epochs, data,
    device and precision. Everything else may differ between members."""
    doc = spec.model_dump(mode="json")
    return json.dumps([doc[f] for f in SHAPING_FIELDS], sort_keys=True)


def check(spec: RunSpec) -> Split:
    """Everything about a run that fails the same way for every trial: data, batch, device, model, loss.

    Returns the run's split. A study checks its runs with this before any trial starts.
    """
    split = load_split(spec.data)
    check_batch(spec, len(split.train))
    device = resolve_device(spec.device)
    check_size(spec, split.train.pocket_dim, split.train.ligand_dim, free_bytes(device))
    with torch.random.fork_rng(devices=[]):
        build_model(spec.model, split.train.pocket_dim, split.train.ligand_dim)
        losses.build(spec)  # a loss whose constructor refuses the run's settings, before any trial starts
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
