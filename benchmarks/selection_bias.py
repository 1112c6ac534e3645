"""What choosing on validation does to validation numbers, and what early stopping saves.

Runs the README's suite (`ablate run-suite baseline-vs-multistage`, its defaults) twice in one fresh
folder: as written (300 epochs) and with `--patience 20` (a separate study in the same stores). For
each experiment it prints the headline's validation metric at each run's selected epoch (the epoch
that metric's family chose: biased upwards) beside the selected model's test score (untouched), and
for the two suites the compute (trial-epochs, wall time) and the test verdicts side by side.

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


def epochs_trained(cwd: Path, study: str) -> tuple[int, int]:
    """(trial-epochs trained, trials) of a study in the folder's Optuna store."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{cwd / 'optuna.db'}").get_trials()
    return sum(int(t.user_attrs.get("epochs_trained", 0)) for t in trials), len(trials)


def rows(report: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["experiment"], r["metric"], r["at"]): r for r in report["rows"]}


def verdict(row: dict[str, Any]) -> str:
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
        print(f"`ablate run-suite {SUITE} {' '.join(extra)}` without and with --patience {args.patience} "
              f"in {cwd} ...", flush=True)
        wall_full, full = run(cwd, extra)
        wall_stop, stop = run(cwd, [*extra, "--patience", str(args.patience)])
        objective, val = full["objective"], full["chosen_by"]
        a, b = rows(full), rows(stop)
        experiments = list(dict.fromkeys(r["experiment"] for r in full["rows"]))

        print(f"\nselection bias, suite as written: {val} at each run's selected epoch (chosen on validation) "
              f"against the selected model's {objective}")
        print(f"  {'experiment':<12} {val + ' selected':>18} {objective + ' selected':>19} {'gap':>8} "
              f"{val + ' final':>15}")
        for e in experiments:
            v, t = a[(e, val, "selected")]["summary"]["mean"], a[(e, objective, "selected")]["summary"]["mean"]
            final = a[(e, val, "final")]["summary"]["mean"]
            print(f"  {e:<12} {v:>18.3f} {t:>19.3f} {v - t:>+8.3f} {final:>15.3f}")

        (ep_full, n_full), (ep_stop, _) = epochs_trained(cwd, full["study"]), epochs_trained(cwd, stop["study"])
        print(f"\ncompute: as written {ep_full} trial-epochs ({n_full} trials) in {wall_full:.1f} s; "
              f"--patience {args.patience}: {ep_stop} trial-epochs in {wall_stop:.1f} s "
              f"({ep_stop / ep_full:.2f}x the epochs, {wall_stop / wall_full:.2f}x the wall time)")
        print(f"\n{objective} against the baseline (difference [95 % CI], Holm p; * < 0.05):")
        print(f"  {'experiment':<12} {'as written':>40} {'--patience ' + str(args.patience):>40}")
        changed = 0
        for e in experiments:
            ra, rb = a[(e, objective, "selected")], b[(e, objective, "selected")]
            changed += ("*" in verdict(ra)) != ("*" in verdict(rb))
            print(f"  {e:<12} {verdict(ra):>40} {verdict(rb):>40}")
        print(f"verdicts that changed (significant or not): {changed}")


if __name__ == "__main__":
    main()
