"""What choosing on validation does to validation numbers, and what early stopping saves.

Runs the README's suite (`ablate run-suite baseline-vs-multistage`, its defaults) three times in one
fresh folder (separate studies in the same stores):

1. as written (300 epochs): each run keeps the epoch with its best val/mrr, scored once on test;
2. with `--patience 20`: the compute saved (trial-epochs, wall time) and the test verdicts of both;
3. as written on the same pairs with validation and test swapped (a data file with its own `split`
   array): training is identical, only the pairs that choose the epoch change.

The selection bias on a set of pairs P is then measured on P alone: P's metric at the epoch P chose
(biased upwards: the maximum of noisy estimates) minus P's metric at the epoch the other pairs
chose (unbiased for P). Comparing validation numbers with test numbers directly would mix in how
much harder one split is than the other.

    python benchmarks/selection_bias.py [--epochs N] [--seeds 0,1,2] [--patience 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SUITE = "baseline-vs-multistage"


def run(cwd: Path, extra: list[str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one suite command and its report.json."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ablate", "run-suite", SUITE, *extra], cwd=cwd,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run-suite {' '.join(extra)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    study = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("study "))
    return seconds, json.loads((cwd / "reports" / study / "report.json").read_text())


def swapped_data(cwd: Path) -> Path:
    """The suite's data as a file whose own split swaps the validation and the test pairs."""
    from ablate.specs import DataSpec
    from ablate.training.data import synthetic_pairs
    from ablate.training.splits import load_split

    spec = DataSpec()
    data, rows = synthetic_pairs(spec.synthetic, seed=spec.seed), load_split(spec).rows
    labels = np.empty(len(data), dtype="<U5")
    labels[rows["train"]], labels[rows["val"]], labels[rows["test"]] = "train", "test", "val"
    path = cwd / "swapped.npz"
    np.savez(path, pocket=data.pocket.numpy(), ligand=data.ligand.numpy(), ligand_id=data.ligand_id.numpy(),
             pocket_id=data.pocket_id.numpy(), split=labels)
    return path


def epochs_trained(cwd: Path, study: str) -> int:
    """Trial-epochs trained by a study in the folder's Optuna store."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{cwd / 'optuna.db'}").get_trials()
    return sum(int(t.user_attrs.get("epochs_trained", 0)) for t in trials)


def mean(report: dict[str, Any], experiment: str, metric: str, at: str = "selected") -> float:
    row = next(r for r in report["rows"] if (r["experiment"], r["metric"], r["at"]) == (experiment, metric, at))
    return float(row["summary"]["mean"])


def verdict(report: dict[str, Any], experiment: str, metric: str) -> str:
    row = next(r for r in report["rows"] if (r["experiment"], r["metric"], r["at"]) == (experiment, metric, "selected"))
    c = row["comparison"]
    if c is None:
        return "(baseline)"
    star = "*" if row["p_holm"] is not None and row["p_holm"] < 0.05 else ""
    return f"{c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] p={row['p_holm']:.3f}{star}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, help="epochs of every run (default: the file's 300)")
    ap.add_argument("--seeds", default=None, help="seeds, e.g. 0,1,2 (default: the file's)")
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--workdir", type=Path, help="keep the stores and reports here (default: a scratch folder)")
    args = ap.parse_args()
    extra = (["--epochs", str(args.epochs)] if args.epochs else []) + (["--seeds", args.seeds] if args.seeds else [])
    with tempfile.TemporaryDirectory() as tmp:
        cwd = args.workdir or Path(tmp)
        cwd.mkdir(parents=True, exist_ok=True)
        print(f"`ablate run-suite {SUITE} {' '.join(extra)}`: as written, with --patience {args.patience}, and with "
              f"validation and test swapped, in {cwd} ...", flush=True)
        wall_full, full = run(cwd, extra)
        wall_stop, stop = run(cwd, [*extra, "--patience", str(args.patience)])
        _, swapped = run(cwd, [*extra, "--data", str(swapped_data(cwd))])
        objective, chosen_by = full["objective"], full["chosen_by"]
        name = chosen_by.split("/", 1)[1]
        experiments = list(dict.fromkeys(r["experiment"] for r in full["rows"]))

        print(f"\nselection bias of {name} and mrr (the selection metric), each measured on one set of pairs: its "
              "value at the epoch those pairs chose minus its value at the epoch the other pairs chose")
        print(f"  {'experiment':<12} {'on validation pairs':>28} {'on test pairs':>28}")
        for e in experiments:
            cells = []
            for metric in (name, "mrr"):
                on_val = mean(full, e, f"val/{metric}") - mean(swapped, e, f"test/{metric}")
                on_test = mean(swapped, e, f"val/{metric}") - mean(full, e, f"test/{metric}")
                cells.append((on_val, on_test))
            print(f"  {e:<12} " + f"{name} {cells[0][0]:+.3f}, mrr {cells[1][0]:+.3f}".rjust(28)
                  + f"{name} {cells[0][1]:+.3f}, mrr {cells[1][1]:+.3f}".rjust(29))
        print(f"\nas written: {chosen_by} at the selected epoch against the selected model's {objective} "
              "(different pairs: the gap mixes selection with how hard each split is)")
        for e in experiments:
            v, t = mean(full, e, chosen_by), mean(full, e, objective)
            print(f"  {e:<12} {v:.3f} {t:.3f} ({v - t:+.3f})")

        ep_full, ep_stop = epochs_trained(cwd, full["study"]), epochs_trained(cwd, stop["study"])
        print(f"\ncompute: as written {ep_full} trial-epochs in {wall_full:.1f} s; --patience {args.patience}: "
              f"{ep_stop} trial-epochs in {wall_stop:.1f} s ({ep_stop / ep_full:.2f}x the epochs, "
              f"{wall_stop / wall_full:.2f}x the wall time)")
        print(f"\n{objective} against the baseline (difference [95 % CI], Holm p; * < 0.05):")
        print(f"  {'experiment':<12} {'as written':>40} {'--patience ' + str(args.patience):>40}")
        changed = 0
        for e in experiments:
            a, b = verdict(full, e, objective), verdict(stop, e, objective)
            changed += ("*" in a) != ("*" in b)
            print(f"  {e:<12} {a:>40} {b:>40}")
        print(f"verdicts that changed (significant or not): {changed}")


if __name__ == "__main__":
    main()
