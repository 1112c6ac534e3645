"""Wall time of default commands before and after the thread policy, on a busy and on an idle machine.

"Before" is another commit of this repository (``--before``, default the last commit without the
policy), checked out into a temporary git worktree and run with the same Python and packages;
"after" is this checkout. Both run in fresh scratch folders, in this one run:

  1. `ablate tune temperature --n-trials 8` (its defaults otherwise) while one other CPU-bound
     process runs (a Python busy loop): torch's default thread count against one share per process;
  2. the README's suite on the idle machine, each as its README gave it: `ablate run-suite
     baseline-vs-multistage --jobs 2` before, the same without --jobs (auto) after.

    python benchmarks/contention.py [--before REF] [--n-trials 8] [--skip-suite]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "cd2c799"


def run(code: Path, args: list[str]) -> float:
    """Seconds `ablate ARGS` takes with the package at ``code``, in a fresh folder."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MLFLOW_TRACKING_URI", "ABLATE_STORAGE"):
        env.pop(var, None)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ablate", *args], cwd=tmp, env=env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`ablate {' '.join(args)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BEFORE, help="the commit to compare with")
    ap.add_argument("--n-trials", type=int, default=8)
    ap.add_argument("--skip-suite", action="store_true", help="only the busy-machine search")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tree:
        old = Path(tree) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.before],
                       check=True)
        try:
            search = ["tune", "temperature", "--n-trials", str(args.n_trials)]
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                t_after = run(ROOT, search)
                t_before = run(old, search)
            finally:
                hog.kill()
            print(f"`ablate {' '.join(search)}` with one other CPU-bound process, {os.cpu_count()} CPUs")
            print(f"  before ({args.before}): {t_before:7.1f} s")
            print(f"  after  (this checkout): {t_after:7.1f} s")
            print(f"  speed-up: {t_before / t_after:.1f}x (target >= 10x)")
            if not args.skip_suite:  # each as its README said: --jobs 2 before, the default (auto) after
                suite = ["run-suite", "baseline-vs-multistage"]
                s_after = run(ROOT, suite)
                s_before = run(old, [*suite, "--jobs", "2"])
                print(f"the README's suite on the idle machine (`{' '.join(suite)}`; before with --jobs 2)")
                print(f"  before ({args.before}): {s_before:7.1f} s")
                print(f"  after  (this checkout): {s_after:7.1f} s")
                print(f"  after / before: {s_after / s_before:.2f} (target <= 1: no slower)")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
