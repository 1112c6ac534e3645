"""Paired against Welch on the same runs of the default suite, and the seeds a precision costs.

1. Trains `ablate run-suite baseline-vs-multistage --seeds 0,...,N-1` (default N = 6) in a folder
   (a fresh temporary one, or --folder to reuse a finished study there).
2. On those runs, at the first 3 and at all N seeds: how many comparisons against the baseline
   each analysis decides (Holm-adjusted p < 0.05 over the four experiments, per metric), for the
   headline metric and over every reported metric at the final epoch, and the half-widths of the
   headline intervals. Both analyses see exactly the same numbers; only the pairing differs.
3. The seeds per experiment (and seed-runs for the whole suite) that each analysis needs for the
   widest headline interval to reach a target half-width, projected from the N-seed spread
   (the smallest n with t(0.975, n-1) * sd / sqrt(n) <= target for the paired differences; the
   Welch interval with both arms' sds). With --until-precise T the suite is then extended with
   `--until-precise T --max-seeds 12` and the seeds it actually took are printed.

    python benchmarks/paired.py [--seeds 6] [--folder DIR] [--until-precise 0.05] [run-suite options]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

from ablate.report import stats
from ablate.report.compare import collect, report_metrics
from ablate.study import studies
from ablate.study.designs import SuiteSpec
from ablate.vocabulary import better, on_split

SUITE = "baseline-vs-multistage"


def suite(folder: Path, seeds: list[int], extra: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ablate", "run-suite", SUITE, "--seeds", ",".join(map(str, seeds)),
                    *extra], cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def values(folder: Path) -> tuple[SuiteSpec, dict[tuple[str, str], dict[int, float]]]:
    """The suite's spec and, per (experiment, metric), the final-epoch value of each seed."""
    ref = studies.load(SUITE, studies.open_storage(f"sqlite:///{folder / 'optuna.db'}", heartbeat_seconds=None))
    spec = ref.spec
    assert isinstance(spec, SuiteSpec)
    report = collect(ref.study, spec)
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in report.trials:
        for metric, v in r.final.items():
            out.setdefault((r.experiment, metric), {})[r.seed] = v
    return spec, out


def decided(spec: SuiteSpec, data: dict[tuple[str, str], dict[int, float]], seeds: list[int],
            metrics: list[str], paired: bool) -> tuple[int, int, list[float]]:
    """(comparisons decided, comparisons made, half-widths of the first metric's intervals)."""
    base = spec.baseline_name
    others = [e for e in spec.experiments if e != base]
    won = made = 0
    halves: list[float] = []
    for i, metric in enumerate(metrics):
        comps = []
        for e in others:
            a = [data.get((e, metric), {}).get(s, math.nan) for s in seeds]
            b = [data.get((base, metric), {}).get(s, math.nan) for s in seeds]
            comps.append(stats.compare(a, b, paired=paired, maximize=better(metric) == "maximize", n_boot=0))
        made += len(comps)  # an undefined p (no spread in the differences) decides nothing
        won += sum(p < 0.05 for p in stats.holm([c.p if math.isfinite(c.p) else 1.0 for c in comps]))
        if i == 0:
            halves = [c.half_width for c in comps]
    return won, made, halves


def seeds_needed(a: np.ndarray, b: np.ndarray, target: float, paired: bool, cap: int = 200) -> int | None:
    """The smallest seeds per arm whose 95 % interval half-width, at the observed spread, is <= target."""
    for n in range(2, cap + 1):
        if paired:
            se = float(np.std(a - b, ddof=1)) / math.sqrt(n)
            df = n - 1
        else:
            va, vb = float(np.var(a, ddof=1)) / n, float(np.var(b, ddof=1)) / n
            se = math.sqrt(va + vb)
            df = (va + vb) ** 2 / (va**2 / (n - 1) + vb**2 / (n - 1)) if va + vb > 0 else n - 1
        if float(sps.t.ppf(0.975, df)) * se <= target:
            return n
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6, help="seeds per experiment to train (at least 4)")
    ap.add_argument("--folder", type=Path, help="a folder to train in or reuse (default: a fresh temporary one)")
    ap.add_argument("--targets", default="0.10,0.05,0.03", help="half-widths to project the seeds for")
    ap.add_argument("--until-precise", type=float, help="then extend the suite with --until-precise this target")
    args, extra = ap.parse_known_args()  # anything else goes to run-suite (e.g. --jobs 1, --array 1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        seeds = list(range(args.seeds))
        seconds = suite(folder, seeds, extra)
        spec, data = values(folder)
        objective = on_split(spec.objective, "val")  # the final epoch's values are validation ones
        print(f"{SUITE}: 5 experiments x {len(seeds)} seeds x {spec.experiments[spec.baseline_name].epochs} epochs "
              f"trained (or reused) in {seconds:.0f} s; comparisons at the final epoch, Holm over 4 per metric")
        metrics = report_metrics(spec)
        print(f"\n{'seeds':>5} {'analysis':>8} {'decided (' + objective + ')':>22} {'decided (all metrics)':>22}"
              f"   half-widths of the {objective} intervals")
        for n in sorted({3, len(seeds)}):
            for paired in (True, False):
                w1, m1, halves = decided(spec, data, seeds[:n], [objective], paired)
                wa, ma, _ = decided(spec, data, seeds[:n], metrics, paired)
                print(f"{n:>5} {'paired' if paired else 'Welch':>8} {f'{w1} of {m1}':>22} {f'{wa} of {ma}':>22}"
                      f"   {'  '.join(f'{h:.3f}' for h in halves)}")
        base = spec.baseline_name
        others = [e for e in spec.experiments if e != base]
        b = np.array([data[(base, objective)][s] for s in seeds])
        print(f"\nseeds per experiment for every {objective} interval to reach ± target "
              f"(projected from the {len(seeds)}-seed spread; seed-runs = 5 x seeds)")
        for target in (float(t) for t in args.targets.split(",")):
            cells = []
            for paired in (True, False):
                need = [seeds_needed(np.array([data[(e, objective)][s] for s in seeds]), b, target, paired)
                        for e in others]
                worst = None if None in need else max(n for n in need if n is not None)
                cells.append("over 200" if worst is None else f"{worst} seeds ({5 * worst} seed-runs)")
            print(f"  ± {target:<5g} paired: {cells[0]:<24} Welch: {cells[1]}")
        if args.until_precise is not None:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ablate", "run-suite", SUITE, "--seeds",
                            ",".join(map(str, seeds)), "--until-precise", str(args.until_precise), "--max-seeds",
                            "12", *extra], cwd=folder, check=True, stdout=subprocess.DEVNULL)
            ref = studies.load(SUITE, studies.open_storage(f"sqlite:///{folder / 'optuna.db'}",
                                                           heartbeat_seconds=None))
            n = sum(t.params.get("experiment") == base for t in ref.study.get_trials(states=studies.FINISHED))
            print(f"\n--until-precise {args.until_precise:g} --max-seeds 12 from {len(seeds)} seeds: stopped at {n} "
                  f"seeds ({5 * n} seed-runs, {time.perf_counter() - t0:.0f} s more)")


if __name__ == "__main__":
    main()
