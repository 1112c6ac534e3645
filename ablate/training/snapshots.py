"""A member's state as a checkpoint keeps it, and a selected model written to a file.

A checkpoint holds everything a member needs to continue after an epoch exactly as if never
stopped: model, optimizer and loss state (a learnable temperature), batch order and random state,
and its selection (``Best``). Where checkpoints are stored is ``ablate.tracking.checkpoints``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ablate.errors import AblateError

if TYPE_CHECKING:
    from ablate.training.devices import AdamW, Amp

CHECKPOINT_FORMAT = 2

NOISE_SEED = 0x5DEECE66D
"""Mixed into a run's seed for its dropout stream, which then differs from its batch-order stream."""


def capture(member: Any, optimizer: AdamW, device: torch.device, amp: Amp, epoch: int) -> dict[str, Any]:
    """Member ``member``'s state after ``epoch`` (a ``trainer.Member``), copied to the CPU."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": cloned(member.model.state_dict()),
        "criterion": cloned(member.criterion.state_dict()),
        "optimizer": [cloned(optimizer.state.get(p, {})) for p in member.params],
        "generator": member.generator.get_state(),
        "noise": member.noise.get_state(),
        "noise_device": device.type,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "best": member.best.document(),
        "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
    }


def restore(member: Any, optimizer: AdamW, device: torch.device, amp: Amp, state: dict[str, Any]) -> int:
    """Put a checkpoint back into a member; returns the epoch to train next."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    member.model.load_state_dict(state["model"])
    member.criterion.load_state_dict(state["criterion"])
    for p, saved in zip(member.params, state["optimizer"], strict=True):
        if saved:  # copies: training must not change the caller's checkpoint
            optimizer.state[p] = {k: v.to(p.device, copy=True) if isinstance(v, Tensor) else v
                                  for k, v in saved.items()}
    member.generator.set_state(state["generator"])
    if state.get("noise_device") == device.type:
        member.noise.set_state(state["noise"])
    else:  # saved on another kind of device (or before runs had a dropout stream): a fresh stream per epoch
        member.noise.manual_seed((member.spec.seed ^ NOISE_SEED) + int(state["epoch"]) + 1)
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    member.best.load(state["best"])
    if state.get("scaler") is not None and amp.scaler is not None:
        amp.scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1


def write_state(state: dict[str, Tensor] | None, path: str | Path) -> Path:
    """Write a model state (state_dict) to a file: whole or not at all (through a temporary file beside it), and a
    failed write (a full disk) as one AblateError."""
    if state is None:
        raise AblateError("no selected model to save: no epoch produced a finite selection metric")
    out = Path(path)
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in state.items()}, buffer)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and not out.is_file():  # a device or a pipe is written as it is
            out.write_bytes(buffer.getvalue())
            return out
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            partial.write_bytes(buffer.getvalue())
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    except OSError as e:
        raise AblateError(f"could not write the selected model to {out}: {e.strerror or e}") from None
    return out


def kept(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of a state dict, where it is (device and dtype), that training can no longer change."""
    return {k: v.detach().clone() for k, v in state.items()}


def cloned(state: Any) -> Any:
    """A copy of a state dict (tensors cloned, on the CPU) that training can no longer change."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v for k, v in state.items()}
