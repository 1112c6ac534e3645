"""compute_screening_metrics: time and memory at screening scale, and its cost on the suite's validation set.

(a) 1,000 pockets screen 100,000 ligands (dim 128; each ligand is the active of one pocket, so about 100
actives per pocket, one row per pair). Printed: wall time against the chunked similarity products alone
(the part no implementation can skip), and the peak resident memory added by the call against the size
of the whole [pockets x ligands] float32 score matrix, which it never holds.
(b) The default suite's validation set with random predicted embeddings: compute_screening_metrics
against compute_retrieval_metrics(reverse=False) on the same inputs, as a ratio.
(c) (b)'s time as a share of one training epoch (validation included) of each default-suite experiment.

    python benchmarks/screening_metrics.py [--pockets 1000] [--ligands 100000] [--dim 128] [--repeats 3] [--epochs 8]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ablate.metrics import CHUNK_ELEMENTS, compute_retrieval_metrics, compute_screening_metrics
from ablate.specs import DataSpec
from ablate.study.designs import SuiteSpec
from ablate.study.studyfiles import load_study
from ablate.training.splits import load_split
from ablate.training.trainer import Trainer


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_added_mib(fn: Callable[[], Any]) -> tuple[Any, float, str]:
    """Run fn; return its result and how far the process's peak resident memory rose above the start."""
    try:  # Linux: reset the high-water mark, so the peak is this call's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, how = _status_kib("VmRSS"), "VmHWM after a reset"
    except OSError:
        before, how = None, "ru_maxrss delta (a lower bound)"
    if before is None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn()
        return out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, how
    out = fn()
    return out, ((_status_kib("VmHWM") or before) - before) / 1024, how


def similarity_only(p: torch.Tensor, lig: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> float:
    """Reference: the same chunked cosine products, reduced to a checksum and nothing else."""
    q, g = F.normalize(p, dim=1), F.normalize(lig, dim=1)
    step = max(1, chunk_elements // g.shape[0])
    buf = torch.empty((step, g.shape[0]))
    total = 0.0
    for start in range(0, q.shape[0], step):
        s = torch.mm(q[start : start + step], g.T, out=buf[: min(step, q.shape[0] - start)])
        total += float(s[:, 0].sum())
    return total


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of fn over repeats."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pockets", type=int, default=1000)
    ap.add_argument("--ligands", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--val-repeats", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=8, help="epochs per experiment for (c)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    # (a) screening scale: one row per (pocket, active) pair; a pocket's rows share its embedding
    centres = torch.randn(args.pockets, args.dim, generator=g)
    pocket_of = torch.randint(0, args.pockets, (args.ligands,), generator=g)
    lig = torch.randn(args.ligands, args.dim, generator=g)
    lig.add_(centres[pocket_of], alpha=0.2)  # the actives lean towards their pocket: metrics above random
    rows = centres[pocket_of]
    n_pockets = int(pocket_of.unique().numel())

    def screen() -> dict[str, float]:
        return compute_screening_metrics(rows, lig, pocket_ids=pocket_of)

    out, added_mib, how = peak_added_mib(screen)
    _, ref_mib, _ = peak_added_mib(lambda: similarity_only(centres, lig))
    full_mib = n_pockets * args.ligands * 4 / 2**20
    t_screen, t_sim = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        t_screen.append(timed(screen, 1))
        t_sim.append(timed(lambda: similarity_only(centres, lig), 1))
    a, b = statistics.median(t_screen), statistics.median(t_sim)
    print(f"(a) {n_pockets} pockets x {args.ligands} ligands, dim {args.dim}, {args.ligands} rows, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"  compute_screening_metrics:                 {a:8.2f} s")
    print(f"  chunked similarity products only:          {b:8.2f} s")
    print(f"  ratio screening / similarity only:         {a / b:8.2f}x")
    print(f"  peak memory added ({how}): {added_mib:.0f} MiB (similarity products alone: {ref_mib:.0f} MiB)")
    print(f"  whole float32 score matrix, never held:   {full_mib:8.0f} MiB  (ratio added / whole: "
          f"{added_mib / full_mib:.2f})")
    print(f"  ef1 {out['ef1']:.2f} (random {out['random_ef1']:.2f}), bedroc {out['bedroc']:.3f} "
          f"(random {out['random_bedroc']:.3f}), auroc {out['auroc']:.3f} (random {out['random_auroc']:.2f})")

    # (b) the default suite's validation set
    val = load_split(DataSpec()).val
    pred = torch.randn(len(val), val.ligand_dim, generator=g)
    t_val_screen, t_val_ret = [], []
    for _ in range(args.val_repeats):
        t_val_screen.append(timed(lambda: compute_screening_metrics(pred, val.ligand, ligand_ids=val.ligand_id), 1))
        t_val_ret.append(timed(
            lambda: compute_retrieval_metrics(pred, val.ligand, ligand_ids=val.ligand_id, reverse=False), 1))
    c, d = statistics.median(t_val_screen), statistics.median(t_val_ret)
    vs = compute_screening_metrics(pred, val.ligand, ligand_ids=val.ligand_id)
    print(f"(b) validation set of DataSpec(): {len(val)} rows, {int(vs['n_ligands'])} distinct ligands, "
          f"dim {val.ligand_dim}, median of {args.val_repeats}")
    print(f"  compute_screening_metrics:                 {1e3 * c:8.2f} ms")
    print(f"  compute_retrieval_metrics(reverse=False):  {1e3 * d:8.2f} ms")
    print(f"  ratio screening / retrieval:               {c / d:8.2f}x")

    # (c) against a whole epoch of each experiment of the default suite (which includes the screening)
    suite = load_study("baseline-vs-multistage")
    assert isinstance(suite, SuiteSpec)
    print(f"(c) screening's share of an epoch of the default suite ({args.epochs} epochs each, median epoch_seconds)")
    for name in suite.experiments:
        run = suite.run(name, 0).model_copy(update={"epochs": args.epochs})
        seconds = statistics.median(r.metrics["epoch_seconds"] for r in Trainer.from_spec(run).epochs())
        print(f"  {name:<12} epoch {1e3 * seconds:7.1f} ms; screening {1e3 * c:5.2f} ms = {100 * c / seconds:4.1f} %")


if __name__ == "__main__":
    main()
