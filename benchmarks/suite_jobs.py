"""Wall time of the quick start's suite with --jobs 2 against --jobs 1 (fresh stores each).

    python benchmarks/suite_jobs.py [--epochs N] [--seeds 0,1,2]

Without --epochs it runs the study file as it is (300 epochs, the README's command).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time


def run(jobs: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ablate", "run-suite", "baseline-vs-multistage", "--jobs", str(jobs),
                        "--out", tmp, *extra], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seeds")
    args = ap.parse_args()
    extra = (["--epochs", str(args.epochs)] if args.epochs else []) + (["--seeds", args.seeds] if args.seeds else [])
    t2 = run(2, extra)
    t1 = run(1, extra)
    print(f"run-suite baseline-vs-multistage {' '.join(extra)}".rstrip())
    print(f"  --jobs 1: {t1:6.1f} s")
    print(f"  --jobs 2: {t2:6.1f} s")
    print(f"  speed-up jobs 2 / jobs 1: {t1 / t2:.2f}x")


if __name__ == "__main__":
    main()
