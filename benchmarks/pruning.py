"""Epochs saved by pruning in the temperature search, and whether the best value survives it.

Runs studies/temperature.toml twice on the embedded default with the same sampler seed, pruning
on (median pruner + stability rules, as in the file) and off, each in its own fresh stores. Then it
re-trains the best configuration of the unpruned search with ``--noise-seeds`` other seeds: the
spread of those values is the seed-to-seed noise the two best values are compared against.

    python benchmarks/pruning.py [--n-trials 24] [--noise-seeds 3] [--jobs 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from ablate.study import studies
from ablate.study.studyfiles import load_study


def run_search(workdir: Path, n_trials: int, jobs: int, extra: list[str]) -> tuple[optuna.Study, float]:
    cmd = [sys.executable, "-m", "ablate", "tune", "temperature", "--n-trials", str(n_trials),
           "--jobs", str(jobs), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    ref = studies.load("temperature", studies.open_storage(f"sqlite:///{workdir / 'optuna.db'}"))
    return ref.study, seconds


def epochs_trained(study: optuna.Study) -> int:
    return sum(int(t.user_attrs.get("epochs_trained", 0)) for t in study.get_trials())


def best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    return study.best_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-trials", type=int, default=24)
    ap.add_argument("--noise-seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    spec = load_study("temperature")
    with tempfile.TemporaryDirectory() as on_dir, tempfile.TemporaryDirectory() as off_dir, \
            tempfile.TemporaryDirectory() as noise_dir:
        on, t_on = run_search(Path(on_dir), args.n_trials, args.jobs, [])
        off, t_off = run_search(Path(off_dir), args.n_trials, args.jobs,
                                ["--set", "pruner.type=none", "--set", "stability.enabled=false"])
        e_on, e_off = epochs_trained(on), epochs_trained(off)
        b_on, b_off = best(on), best(off)
        # seed-to-seed noise of the unpruned best configuration
        temperature = b_off.params["temperature"]
        seeds = ",".join(str(100 + i) for i in range(args.noise_seeds))
        suite = Path(noise_dir) / "noise.toml"
        suite.write_text(
            'kind = "suite"\nname = "temperature-noise"\nmetric = "val/mrr"\n'
            f"seeds = [{seeds}]\n[base]\nloss = \"infonce\"\nlr = {spec.base.lr}\n"
            f"batch_size = {spec.base.batch_size}\nepochs = {spec.base.epochs}\n"
            f"[experiments.best]\ntemperature = {temperature}\n"
        )
        subprocess.run([sys.executable, "-m", "ablate", "run-suite", str(suite), "--jobs", str(args.jobs)],
                       cwd=noise_dir, check=True, stdout=subprocess.DEVNULL)
        ref = studies.load("temperature-noise", studies.open_storage(f"sqlite:///{Path(noise_dir) / 'optuna.db'}"))
        values = [t.user_attrs["best"]["val/mrr"] for t in ref.study.get_trials()
                  if t.state == optuna.trial.TrialState.COMPLETE]
    sd = statistics.stdev(values)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in on.get_trials())
    rules: dict[str, int] = {}
    for t in on.get_trials():
        rule = (t.user_attrs.get("pruned_by") or {}).get("rule")
        if rule:
            rules[rule] = rules.get(rule, 0) + 1
    print(f"temperature search, {args.n_trials} trials of {spec.base.epochs} epochs, sampler seed "
          f"{spec.sampler.seed}, jobs {args.jobs}")
    print(f"  pruning on : {e_on:6d} epochs trained, {t_on:6.0f} s, {pruned} trials pruned {rules}, "
          f"best val/mrr {b_on.value:.4f} at temperature {b_on.params['temperature']:.4f}")
    print(f"  pruning off: {e_off:6d} epochs trained, {t_off:6.0f} s, "
          f"best val/mrr {b_off.value:.4f} at temperature {b_off.params['temperature']:.4f}")
    print(f"  epochs saved: {1 - e_on / e_off:.1%} (target >= 30 %); wall time saved: {1 - t_on / t_off:.1%}")
    print(f"  seed-to-seed noise of the unpruned best (temperature {temperature:.4f}, {len(values)} seeds): "
          f"mean {statistics.mean(values):.4f}, sd {sd:.4f}")
    gap = b_off.value - b_on.value
    print(f"  best(off) - best(on) = {gap:+.4f} = {gap / sd if sd else float('inf'):+.2f} sd "
          f"({'within' if abs(gap) <= 2 * sd else 'outside'} 2 sd of the seed noise)")


if __name__ == "__main__":
    main()
