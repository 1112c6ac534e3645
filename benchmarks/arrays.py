"""Trial arrays against one trial at a time, side by side in one run.

1. The README's suite (`ablate run-suite baseline-vs-multistage`, its defaults) with `--array auto`
   and with `--array 1`, each in a fresh folder: wall times, and whether every experiment's mean
   of the headline metric lies inside the other run's 95 % interval (the same trials, trained
   fused or alone, must tell the same story). `--case wide` runs it on a wide head (256 -> 512 ->
   512 -> 1536) and about 6,300 synthetic pairs, the size of a real molecular set, with `--jobs 2`.
   Target: auto at least as fast as --array 1 in every case.
2. Member-steps per second of one process at K = 1, 3, 5, 15 members (InfoNCE, batch 32), for the
   default head (64 -> 256 -> 128) and a wide one (256 -> 512 -> 512 -> 1536), on --device.

    python benchmarks/arrays.py [--epochs N] [--rounds 2] [--case default|wide] [--device cpu|cuda]
                                [--skip-suite] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ablate.specs import DataSpec, RunSpec, SyntheticSpec
from ablate.training.arrays import time_steps
from ablate.training.splits import load_split

HEADS = {
    "default 64->256->128": (SyntheticSpec(), [256]),
    "wide 256->512->512->1536": (SyntheticSpec(pocket_dim=256, ligand_dim=1536), [512, 512]),
}


CASES = {
    "default": [],
    "wide": ["--jobs", "2", "--set", "model.hidden=[512,512]", "--set", "data.synthetic.pocket_dim=256",
             "--set", "data.synthetic.ligand_dim=1536", "--set", "data.synthetic.n_ligands=4000"],
}
"""Extra arguments of the suite per case (the wide one: a real data set's size and head)."""


def suite(array: str, extra: list[str]) -> tuple[float, dict[str, dict[str, float]]]:
    """Wall seconds of the suite and, per experiment, the headline metric's mean and CI half-width; prints what
    `--array auto` chose and why."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ablate", "run-suite", "baseline-vs-multistage", "--array",
                               array, *extra], cwd=tmp, check=True, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t0
        for line in dict.fromkeys(ln.strip() for ln in done.stdout.splitlines() if "array" in ln and "by" in ln):
            print(f"  [{array}, {seconds:.1f} s] {line}")
        (report,) = Path(tmp, "reports").glob("*/report.json")
        rows = json.loads(report.read_text())["rows"]
    out = {}
    for r in rows:
        if r["metric"] == "val/top1" and r["at"] == "final":
            s = r["summary"]
            out[r["experiment"]] = {"mean": s["mean"], "half": (s["ci_high"] - s["ci_low"]) / 2}
    return seconds, out


def member_steps(device: str) -> None:
    print(f"member-steps per second (one process, {torch.get_num_threads()} thread(s), device {device}, "
          "InfoNCE, batch 32; median of 3)")
    for label, (synthetic, hidden) in HEADS.items():
        run = RunSpec(loss="infonce", batch_size=32, device=device, model={"hidden": hidden},
                      data=DataSpec(synthetic=synthetic))
        split = load_split(run.data)
        train, val = split.train, split.val
        rates = {}
        for k in (1, 3, 5, 15):
            specs = [run.model_copy(update={"seed": i}) for i in range(k)]
            times = sorted(time_steps(specs, train, val, steps=10) for _ in range(3))
            rates[k] = k / times[1]
        cells = "  ".join(f"K={k}: {r:7.0f} ({r / rates[1]:.1f}x)" for k, r in rates.items())
        print(f"  {label:<26} {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, help="suite epochs (default: the file's 300)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the member-steps part")
    ap.add_argument("--skip-suite", action="store_true")
    ap.add_argument("--case", choices=sorted(CASES), default="default")
    ap.add_argument("--rounds", type=int, default=2, help="suite runs per setting, alternating (the best counts)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_suite:
        extra = (["--epochs", str(args.epochs)] if args.epochs else []) + CASES[args.case]
        times: dict[str, list[float]] = {"auto": [], "1": []}
        for _ in range(args.rounds):  # alternating, so that a busy moment of the machine hits both
            for array in times:
                seconds, found = suite(array, extra)
                times[array].append(seconds)
                if array == "auto":
                    fused = found
                else:
                    alone = found
        t_fused, t_alone = min(times["auto"]), min(times["1"])
        shown = {a: ", ".join(f"{t:.1f}" for t in ts) for a, ts in times.items()}
        print(f"README suite{' ' + ' '.join(extra) if extra else ''} (best of {args.rounds}): --array auto "
              f"{t_fused:.1f} s [{shown['auto']}], --array 1 {t_alone:.1f} s [{shown['1']}]: "
              f"{t_alone / t_fused:.2f}x (target: >= 1.0x in every case)")
        for exp in alone:
            a, b = fused[exp], alone[exp]
            inside = abs(a["mean"] - b["mean"]) <= min(a["half"], b["half"])
            print(f"  val/top1 {exp:<11} fused {a['mean']:.4f} ± {a['half']:.4f}  alone {b['mean']:.4f} ± "
                  f"{b['half']:.4f}  {'inside each other' if inside else 'OUTSIDE'}")
    member_steps(args.device)


if __name__ == "__main__":
    main()
