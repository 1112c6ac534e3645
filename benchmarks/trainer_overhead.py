"""Per-epoch time of ablate's trainer with MLflow logging against two hand-written loops.

On the default synthetic data, in one process, with the same model, loss, batch size and optimizer:

  (a) ablate: ``train_and_log`` (the trainer, every metric of the vocabulary, MLflow logging on)
  (b) a bare PyTorch loop: tensors indexed by a permutation, validation with
      compute_retrieval_metrics (the quick-start's evaluation), no logging
  (c) the common pattern: TensorDataset + DataLoader, loss.item() per step, and one
      mlflow.log_metric call per metric per epoch (fluent API), same validation

Each variant trains ``--epochs`` epochs; the time per epoch is measured from the end of the first
epoch to the end of the last (steady state: start-up and run creation are left out). The three
variants run interleaved ``--repeats`` times and the medians are compared. Targets: (a)/(b) <= 1.10
and (c)/(a) >= 2.

    python benchmarks/trainer_overhead.py [--loss mse] [--batch-size 16] [--epochs 30] [--repeats 3]
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

from ablate import losses
from ablate.metrics import compute_retrieval_metrics
from ablate.specs import RunSpec
from ablate.tracking.client import Tracker
from ablate.tracking.runs import train_and_log
from ablate.training.models import build_model
from ablate.training.splits import load_split


def per_epoch(stamps: list[float]) -> float:
    """Seconds per epoch between the end of the first and the end of the last epoch."""
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def run_ablate(spec: RunSpec, tracker: Tracker, exp: str) -> float:
    stamps: list[float] = []

    def hook(result, history):  # called after each epoch, once its metrics are queued for MLflow
        stamps.append(time.perf_counter())

    train_and_log(spec, tracker, exp, "bench", on_epoch=hook)
    return per_epoch(stamps)


def _validate(model, criterion, val):
    model.eval()
    with torch.no_grad():
        pred = model(val.pocket)
        vloss = float(criterion(pred, val.ligand, val.ligand_id))
        metrics = compute_retrieval_metrics(pred, val.ligand, ligand_ids=val.ligand_id, reverse=False)
    model.train()
    return vloss, metrics


def _setup(spec: RunSpec):
    """The same data, seeded model, loss and optimizer for both hand-written references."""
    split = load_split(spec.data)
    train, val = split.train, split.val
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, train.pocket_dim, train.ligand_dim)
    criterion = losses.build(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, fused=True)
    return train, val, model, criterion, opt


def run_bare(spec: RunSpec) -> float:
    train, val, model, criterion, opt = _setup(spec)
    b = spec.batch_size
    stamps = []
    for _ in range(spec.epochs):
        perm = torch.randperm(len(train))
        for i in range(len(train) // b):
            idx = perm[i * b:(i + 1) * b]
            loss = criterion(model(train.pocket[idx]), train.ligand[idx], train.ligand_id[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _validate(model, criterion, val)
        stamps.append(time.perf_counter())
    return per_epoch(stamps)


def run_dataloader(spec: RunSpec, uri: str) -> float:
    import mlflow
    from torch.utils.data import DataLoader, TensorDataset

    train, val, model, criterion, opt = _setup(spec)
    loader = DataLoader(TensorDataset(train.pocket, train.ligand, train.ligand_id), batch_size=spec.batch_size,
                        shuffle=True, drop_last=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-dataloader")
    stamps = []
    with mlflow.start_run():
        for epoch in range(spec.epochs):
            total, steps = 0.0, 0
            for x, y, ids in loader:
                loss = criterion(model(x), y, ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
            vloss, m = _validate(model, criterion, val)
            logged = {"train/loss": total / steps, "val/loss": vloss, "val/cosine": m["mean_cosine"],
                      "val/top1": m["top1_accuracy"], "val/top5": m["top5_accuracy"],
                      "val/top10": m["top10_accuracy"], "val/mrr": m["mrr"], "val/median_rank": m["median_rank"],
                      "val/alignment": m["alignment"], "val/uniformity": m["uniformity"],
                      "val/spread": m["spread"], "lr": spec.lr}
            for key, value in logged.items():
                mlflow.log_metric(key, value, step=epoch)
            stamps.append(time.perf_counter())
    return per_epoch(stamps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: what --jobs N gives each worker)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    spec = RunSpec(loss=args.loss, batch_size=args.batch_size, epochs=args.epochs, device="cpu")
    train = load_split(spec.data).train
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        tracker = Tracker(uri)
        exp = tracker.experiment_id("bench-ablate")
        run_ablate(spec.model_copy(update={"epochs": 3}), tracker, exp)  # warm-up: imports, store creation
        run_dataloader(spec.model_copy(update={"epochs": 3}), uri)
        a, b, c = [], [], []
        for _ in range(args.repeats):
            a.append(run_ablate(spec, tracker, exp))
            b.append(run_bare(spec))
            c.append(run_dataloader(spec, uri))
    ta, tb, tc = statistics.median(a), statistics.median(b), statistics.median(c)
    print(f"default synthetic data: {len(train)} training pairs; loss {args.loss}, batch {args.batch_size}, "
          f"{args.epochs} epochs x {args.repeats} repeats, torch threads {args.threads}")
    print(f"  (a) ablate fit + MLflow logging:          {ta * 1000:8.1f} ms/epoch")
    print(f"  (b) bare PyTorch loop, no logging:        {tb * 1000:8.1f} ms/epoch")
    print(f"  (c) DataLoader + mlflow.log_metric each:  {tc * 1000:8.1f} ms/epoch")
    print(f"  (a)/(b) = {ta / tb:.3f}  (target <= 1.10)")
    print(f"  (c)/(a) = {tc / ta:.2f}   (target >= 2)")


if __name__ == "__main__":
    main()
