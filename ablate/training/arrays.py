"""The execution plan of trial arrays: how many compatible trials a worker trains as one array.

``--array 1`` trains one trial at a time; ``--array K`` up to K compatible trials together;
``--array auto`` (the default) measures: it times whole epochs' worth of work (optimizer steps and a
validation) of arrays of 1, 2, 4, ... members (and of all the waiting ones) on the real device, data
and model, the sizes interleaved over three rounds and each taken at its median, and takes the size
that trains the waiting trials soonest on the workers that share them (``clearing_size``: never 8 when
9 are waiting and 9 run about as fast, never one array for a worker while another idles), within the
memory the device has free. Fusing must win by a margin (``MARGIN``) over one at a time, so noise
never fuses trials that train as fast apart. The choice is made once per kind of run and process,
and said once.
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

MARGIN = 0.1
"""Trials are fused only when an array clears them at least this much sooner than one at a time."""

ROUNDS = 3
"""Measurements of each size, interleaved; each size's median counts."""

MEASURE_SHARE = 0.05
"""Measuring may cost at most this share of the work queued for each worker (in member-epochs): a short study is
trained one trial at a time rather than spend more on measuring than fusing could save."""


@dataclass(frozen=True)
class ArrayChoice:
    """An array size, and the measurement that chose it (empty when it was not measured)."""

    size: int
    reason: str = ""


_CHOSEN: dict[Any, ArrayChoice] = {}


def choose(run: RunSpec, waiting: int, array: int | None, workers: int = 1) -> ArrayChoice:
    """The array size for trials shaped like ``run`` with ``waiting`` compatible trials queued and ``workers``
    processes of this command taking them.

    ``array`` is the user's choice: a size, or None for auto.
    """
    if array is not None:
        return ArrayChoice(max(1, min(array, waiting)))
    if waiting <= 1:
        return ArrayChoice(1)
    from ablate.training.preflight import fusion_key

    key = (fusion_key(run), min(waiting, CANDIDATES[-1]), workers)
    if key not in _CHOSEN:
        _CHOSEN[key] = _measure(run, waiting, workers)
    return _CHOSEN[key]


def _affordable(sizes: list[int], budget: float) -> list[int]:
    """The smallest sizes whose measurement (``ROUNDS`` epochs of each, k member-epochs at size k) fits the budget."""
    kept: list[int] = []
    for k in sorted(sizes):
        if (sum(kept) + k) * ROUNDS > budget:
            break
        kept.append(k)
    return kept


def _measure(run: RunSpec, waiting: int, workers: int) -> ArrayChoice:
    import statistics

    import torch

    budget = MEASURE_SHARE * waiting * run.epochs / max(1, workers)
    if len(_affordable([1, 2], budget)) < 2:
        return ArrayChoice(1, f"{waiting} trial(s) of {run.epochs} epoch(s) for {workers} worker(s): too little work "
                              "for measuring array sizes to pay; one at a time")

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
        sizes = _affordable(sizes, budget)
        seconds: dict[int, list[float]] = {k: [] for k in sizes}
        for _ in range(ROUNDS):  # interleaved: a spell of load slows every size alike
            for k in sorted(sizes):
                specs = [run.model_copy(update={"seed": run.seed + i}) for i in range(k)]
                seconds[k].append(epoch_seconds(specs, train, val))
        rates = {k: k / statistics.median(v) for k, v in seconds.items()}  # member-epochs per second
    finally:
        torch.set_rng_state(state)
    best = clearing_size(rates, waiting, workers)
    shown = ", ".join(f"{k}: {rates[k]:.2f}" for k in sorted(rates))
    on = f" for {workers} workers" if workers > 1 else ""
    return ArrayChoice(best, f"member-epochs/s by array size {{{shown}}} on {device}: arrays of {best}{on} "
                             f"({rates[best] / rates[1]:.1f}x one at a time)")


def clearing_size(rates: dict[int, float], waiting: int, workers: int = 1, margin: float = MARGIN) -> int:
    """The array size (a key of ``rates``, member throughput by size) that trains ``waiting`` trials soonest on
    ``workers`` workers: full arrays of that size, then the rest as one array (at the rate of the largest
    measured size that fits it), each array to the worker free first. Fusing has to pay for itself: one at a time
    unless the soonest size clears them more than ``margin`` sooner (``rates[1]`` must be measured)."""
    def seconds(k: int) -> float:
        full, rest = divmod(waiting, k)
        arrays = [k] * full + ([rest] if rest else [])
        loads = [0.0] * max(1, workers)
        for size in arrays:
            i = loads.index(min(loads))
            loads[i] += size / rates[max(s for s in rates if s <= size)]
        return max(loads)

    best = min(sorted(rates), key=seconds)
    return best if seconds(1) > seconds(best) * (1 + margin) else 1


def memory_cap(run: RunSpec, pocket_dim: int, ligand_dim: int, device: Any) -> int:
    """How many members fit in MEMORY_SHARE of the device's free memory (``models.training_bytes`` each)."""
    from ablate.training.devices import free_bytes
    from ablate.training.models import training_bytes

    return int(free_bytes(device) * MEMORY_SHARE // max(1, training_bytes(run, pocket_dim, ligand_dim)))


def time_steps(specs: Sequence[RunSpec], train: PairedEmbeddings, val: PairedEmbeddings, steps: int = 6) -> float:
    """Seconds per optimizer step (``Trainer.step``) of an array of ``specs`` (one warm-up step first), for planning."""
    from ablate.training.trainer import Trainer

    return _time_steps(Trainer(specs, train, val), steps)


def _time_steps(trainer: Any, steps: int) -> float:
    import time

    import torch

    trainer.losses.set_epoch(0)
    trainer._set_lr(0)
    trainer.models.train()
    eff = trainer.spec.effective_batch_size
    n = min(len(trainer.train) // eff, steps + 1)
    idx = torch.arange(n * eff, device=trainer.device).expand(len(trainer.specs), -1)
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


def epoch_seconds(specs: Sequence[RunSpec], train: PairedEmbeddings, val: PairedEmbeddings, steps: int = 4) -> float:
    """Seconds of one epoch of an array of ``specs``, estimated from ``steps`` optimizer steps (after a warm-up
    step) and one validation, for planning."""
    import time

    from ablate.training.trainer import Trainer

    trainer = Trainer(specs, train, val)
    step = _time_steps(trainer, steps)
    start = time.perf_counter()
    trainer._validate()
    validation = time.perf_counter() - start
    return len(trainer.train) // trainer.spec.effective_batch_size * step + validation
