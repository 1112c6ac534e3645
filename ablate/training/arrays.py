"""The execution plan of trial arrays: how many compatible trials a worker trains as one array.

``--array 1`` trains one trial at a time; ``--array K`` up to K compatible trials together;
``--array auto`` (the default) measures: it times a few optimizer steps of arrays of 1, 2, 4, ...
members (and of all the waiting ones) on the real device, data and model, and takes the size that
trains the waiting trials soonest (``clearing_size``: 1 when fusing does not pay, and never 8 when
9 are waiting and 9 run about as fast, which would leave one to train alone afterwards), within the
memory the device has free. The choice is made once per kind of run and process, and said once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ablate.specs import RunSpec

if TYPE_CHECKING:
    from ablate.training.data import PairedEmbeddings

CANDIDATES = (1, 2, 4, 8, 16, 32)
"""Array sizes auto measures (up to the number of compatible trials waiting)."""

MEMORY_SHARE = 0.5
"""Arrays use at most this share of the device's free memory (estimated per member)."""


@dataclass(frozen=True)
class ArrayChoice:
    """An array size, and the measurement that chose it (empty when it was not measured)."""

    size: int
    reason: str = ""


_CHOSEN: dict[Any, ArrayChoice] = {}


def choose(run: RunSpec, waiting: int, array: int | None) -> ArrayChoice:
    """The array size for trials shaped like ``run`` with ``waiting`` compatible trials queued.

    ``array`` is the user's choice: a size, or None for auto.
    """
    if array is not None:
        return ArrayChoice(max(1, min(array, waiting)))
    if waiting <= 1:
        return ArrayChoice(1)
    from ablate.training.preflight import fusion_key

    key = (fusion_key(run), min(waiting, CANDIDATES[-1]))
    if key not in _CHOSEN:
        _CHOSEN[key] = _measure(run, waiting)
    return _CHOSEN[key]


def _measure(run: RunSpec, waiting: int) -> ArrayChoice:
    import torch

    from ablate.training.devices import amp_for, resolve_device
    from ablate.training.splits import load_split
    device = resolve_device(run.device)
    if amp_for(device, run.amp).scaler is not None:
        return ArrayChoice(1, "float16 with a gradient scaler: members train alone")
    state = torch.get_rng_state()
    try:  # measuring (models are built and trained) leaves the random state as it was
        split = load_split(run.data)
        train, val = split.train, split.val
        cap = max(1, memory_cap(run, train.pocket_dim, train.ligand_dim, device))
        sizes = [k for k in CANDIDATES if k <= min(waiting, cap)]
        if waiting <= cap and waiting not in sizes and waiting < CANDIDATES[-1]:
            sizes.append(waiting)
        rates: dict[int, float] = {}
        for k in sorted(sizes):
            specs = [run.model_copy(update={"seed": run.seed + i}) for i in range(k)]
            rates[k] = k / min(time_steps(specs, train, val, steps=4) for _ in range(3))  # min: robust to load
    finally:
        torch.set_rng_state(state)
    best = clearing_size(rates, waiting)
    shown = ", ".join(f"{k}: {rates[k]:.0f}" for k in sorted(rates))
    return ArrayChoice(best, f"member-steps/s by array size {{{shown}}} on {device}: "
                             f"arrays of {best} ({rates[best] / rates[1]:.1f}x one at a time)")


def clearing_size(rates: dict[int, float], waiting: int) -> int:
    """The array size (a key of ``rates``, member-steps per second by size) that trains ``waiting``
    trials in the least time: full arrays of that size, then the rest as one array (at the rate of
    the largest measured size that fits it)."""
    def seconds(k: int) -> float:
        full, rest = divmod(waiting, k)
        tail = rest / rates[max(s for s in rates if s <= rest)] if rest else 0.0
        return full * k / rates[k] + tail

    return min(sorted(rates), key=seconds)


def memory_cap(run: RunSpec, pocket_dim: int, ligand_dim: int, device: Any) -> int:
    """How many members fit in MEMORY_SHARE of the device's free memory (``models.training_bytes`` each)."""
    from ablate.training.devices import free_bytes
    from ablate.training.models import training_bytes

    return int(free_bytes(device) * MEMORY_SHARE // max(1, training_bytes(run, pocket_dim, ligand_dim)))


def time_steps(specs: Sequence[RunSpec], train: PairedEmbeddings, val: PairedEmbeddings, steps: int = 6) -> float:
    """Seconds per optimizer step (``Trainer.step``) of an array of ``specs`` (one warm-up step first), for planning."""
    import time

    import torch

    from ablate.training.trainer import Trainer

    trainer = Trainer(specs, train, val)
    trainer.losses.set_epoch(0)
    trainer._set_lr(0)
    trainer.models.train()
    eff = trainer.spec.effective_batch_size
    n = min(len(trainer.train) // eff, steps + 1)
    idx = torch.arange(n * eff, device=trainer.device).expand(len(specs), -1)
    x, y, lid = trainer.train.pocket[idx], trainer.train.ligand[idx], trainer.train.ligand_id[idx]
    start = time.perf_counter()
    for step in range(n):
        if step == 1:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            start = time.perf_counter()
        window = slice(step * eff, (step + 1) * eff)
        trainer.step(x[:, window], y[:, window], lid[:, window])
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return (time.perf_counter() - start) / max(1, n - 1)
