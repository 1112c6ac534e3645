"""What checkpointing a running trial costs: the same tracked run with checkpoints on and off.

Trains the default suite's InfoNCE run (the built-in synthetic data) through `train_and_log_members`,
logging to a scratch MLflow store, once with checkpoints written into the run's artifacts (as a
worker does) and once without, interleaved `--repeats` times in this process. Target: at most 2 %.

    python benchmarks/checkpoints.py [--epochs 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ablate.specs import RunSpec
from ablate.tracking.client import Tracker
from ablate.tracking.runs import train_and_log_members
from ablate.training.trainer import Trainer


def run(spec: RunSpec, tracker: Tracker, exp: str, checkpoints: bool) -> tuple[float, int]:
    written: list[int] = []
    trainer = Trainer.from_spec(spec)
    start = time.perf_counter()
    train_and_log_members(trainer, tracker, exp, ["bench"], tags=[{}],
                          on_checkpoint=(lambda k, epoch: written.append(epoch)) if checkpoints else None)
    return time.perf_counter() - start, len(written)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    spec = RunSpec(loss="infonce", lr=5e-4, batch_size=32, epochs=args.epochs, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        exp = tracker.experiment_id("bench-checkpoints")
        run(spec.model_copy(update={"epochs": 3}), tracker, exp, True)  # warm-up
        on, off, count = [], [], []
        for _ in range(args.repeats):
            t, n = run(spec, tracker, exp, True)
            on.append(t)
            count.append(n)
            off.append(run(spec, tracker, exp, False)[0])
    a, b = statistics.median(on), statistics.median(off)
    print(f"default InfoNCE run, {args.epochs} epochs, 1 torch thread, median of {args.repeats}")
    print(f"  checkpoints on : {a:7.2f} s ({statistics.median(count):.0f} checkpoints written)")
    print(f"  checkpoints off: {b:7.2f} s")
    print(f"  cost: {100 * (a / b - 1):+.1f} % (target <= 2 %)")


if __name__ == "__main__":
    main()
