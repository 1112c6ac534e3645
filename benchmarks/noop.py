"""Wall time of commands that have nothing to train: mistakes, a finished suite re-run, report, show.

Each command runs as a fresh process (`python -m ablate ...`), as a user types it, and is timed from
start to exit. The suite and a short temperature search are trained first, in a scratch folder (or
use --workdir with a folder where they have already run); the re-runs, `ablate report` and `ablate
studies show` then find them finished. Targets: a mistake under 1.5 s, the others under 5 s.

    python benchmarks/noop.py [--epochs N] [--workdir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "baseline-vs-multistage"


def timed(args: list[str], cwd: Path, expect: int = 0) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ablate", *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != expect:
        raise SystemExit(f"`ablate {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, help="train the suite with this many epochs (default: the file's 300)")
    ap.add_argument("--workdir", type=Path, help="a folder where the suite has already run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    search = ["tune", "temperature", "--n-trials", "8", "--epochs", "20"]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = args.workdir or Path(tmp)
        if args.workdir is None:
            print(f"training `ablate run-suite {SUITE} {' '.join(extra)}` first ...", flush=True)
            timed(["run-suite", SUITE, *extra], cwd)
            print(f"training `ablate {' '.join(search)}` first ...", flush=True)
            timed(search, cwd)
        cases = {
            "mistake: train --loss-fn infonse": (["train", "--loss-fn", "infonse"], 2, 1.5),
            "mistake: run-suite --set lr=fast": (["run-suite", SUITE, "--set", "lr=fast", *extra], 2, 1.5),
            "re-run of the finished suite": (["run-suite", SUITE, *extra], 0, 5.0),
            "ablate report": (["report", SUITE], 0, 5.0),
            "ablate studies show": (["studies", "show", SUITE], 0, 5.0),
            "re-run of the finished search": (search, 0, 5.0),
        }
        print(f"median wall time of {args.repeats} fresh processes each")
        for label, (argv, code, target) in cases.items():
            times = [timed(argv, cwd, code) for _ in range(args.repeats)]
            median = statistics.median(times)
            verdict = "ok" if median <= target else "SLOW"
            print(f"  {label:<36} {median:6.2f} s  (target < {target:g} s: {verdict})")


if __name__ == "__main__":
    main()
