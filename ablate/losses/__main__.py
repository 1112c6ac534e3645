"""``python -m ablate.losses``: each built-in loss on a random batch and on a perfectly aligned one."""

from __future__ import annotations

import math
from typing import Any

import torch

from ablate.losses import build_loss, builtin_names, resolve


def main() -> None:
    """Print each loss on a random and an aligned batch; check InfoNCE at equal similarities against ln B."""
    torch.manual_seed(0)
    b, d = 32, 128
    target = torch.randn(b, d)
    pred = torch.randn(b, d)
    print(f"ablate.losses self-check (batch {b}, dim {d}); ln(B) = {math.log(b):.4f}")
    print(f"{'loss':<10} {'random':>10} {'aligned':>10}")
    for name in builtin_names():
        crit: Any = build_loss(name)
        if hasattr(crit, "get_loss"):  # a schedule: each stage's loss and learning rate
            for epoch in (0, 50, 150):
                stage_loss, stage = crit.get_loss(epoch)
                print(f"{name} epoch {epoch:>3}: {stage:<11} {type(stage_loss).__name__:<15} "
                      f"lr {crit.get_recommended_lr():g}")
            continue
        rand = crit(pred, target).item()
        aligned = crit(target * 2.0, target).item()
        print(f"{resolve(name).label:<10} {rand:>10.4f} {aligned:>10.4f}")
    equal = build_loss("infonce")(torch.ones(b, d), torch.ones(b, d)).item()
    ok = abs(equal - math.log(b)) < 1e-4
    print(f"InfoNCE at equal similarities: {equal:.4f} (ln B = {math.log(b):.4f}) {'OK' if ok else 'MISMATCH'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
