"""The hardware a run trains on: which device, which mixed precision, which optimizer kernel."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ablate.errors import AblateError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise AblateError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise AblateError(
                f"device {name!r} is not available (this machine has {count} CUDA device(s)); "
                "use --device auto or cpu"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise AblateError(f"device {name!r} is not available; use --device auto or cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise AblateError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev



@dataclass
class Amp:
    """Mixed precision on a device: off, bfloat16, or float16 with a gradient scaler."""

    enabled: bool
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    device_type: str = "cpu"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of this precision (a no-op when AMP is off)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def label(self) -> str:
        """off, bf16 or fp16."""
        if not self.enabled or self.dtype is None:
            return "off"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))


def amp_for(device: torch.device, requested: bool | None) -> Amp:
    """Mixed precision for a device (on by default on CUDA): bfloat16 where native, else float16 with a scaler."""
    enabled = requested if requested is not None else device.type == "cuda"
    if not enabled:
        return Amp(False, device_type=device.type)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        # bfloat16 is native from Ampere (compute capability 8) on; before that, float16 + scaler
        return Amp(True, torch.float16, torch.amp.GradScaler("cuda"), "cuda")
    if device.type == "mps":
        return Amp(True, torch.float16, torch.amp.GradScaler("mps"), "mps")
    return Amp(True, torch.bfloat16, None, device.type)


def adamw(groups: list[dict[str, Any]], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cpu", "cuda", "mps"))
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)

