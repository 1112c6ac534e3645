"""The hardware a run trains on: which device, how many CPU threads, which mixed precision, which optimizer."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

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


class AdamW:
    """AdamW (Loshchilov & Hutter, decoupled weight decay), computed by the same kernels as
    ``torch.optim.AdamW(fused=True)``: ``torch._fused_adamw_`` where the device has it, else the same
    update in ``torch._foreach_*`` operations (as ``foreach=True``).

    ``torch.optim`` imports the TorchDynamo compiler on an optimizer's first use (about a second
    per process, a quarter of a worker's start-up) and pays Python bookkeeping on every step; this
    class keeps the interface the trainer and ``torch.amp.GradScaler`` use (``param_groups``,
    ``defaults``, ``state``, ``step``, ``zero_grad``) and torch's state layout (``step``,
    ``exp_avg``, ``exp_avg_sq`` per parameter), so checkpoints are those of ``torch.optim.AdamW``.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, device: torch.device, *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        self.defaults: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.param_groups: list[dict[str, Any]] = [{**self.defaults, **g, "params": list(g["params"])}
                                                   for g in groups]
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self.fused = device.type in ("cpu", "cuda", "mps")

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in group["params"]:  # the kernels take tensors of one device and dtype (as torch.optim groups them)
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            for params in by_kind.values():
                self._update(group, params)

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Update ``params`` (of one device and dtype, all with a gradient) with ``group``'s settings."""
        for p in params:
            if p not in self.state:
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        states = [self.state[p] for p in params]
        grads = cast(list[Tensor], [p.grad for p in params])  # step passes only parameters with one
        steps = [s["step"] for s in states]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        torch._foreach_add_(steps, 1)
        if self.fused:
            try:
                torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                    lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps,
                                    maximize=False, grad_scale=None, found_inf=None)
                return
            except (RuntimeError, NotImplementedError):  # a device or dtype without the fused kernel
                self.fused = False
        _foreach_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, wd, eps)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every parameter's gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


def _foreach_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   steps: list[Tensor], lr: float, beta1: float, beta2: float, wd: float, eps: float) -> None:
    """The AdamW update of ``torch.optim.AdamW(foreach=True)`` (steps already counted)."""
    torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    counts = [float(s) for s in steps]
    step_sizes = [lr / (1 - beta1 ** n) for n in counts]
    root_corrections = [(1 - beta2 ** n) ** 0.5 for n in counts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, root_corrections)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-s for s in step_sizes])


# --------------------------------------------------------------------------------------
# CPU threads: one process, one share of the machine
# --------------------------------------------------------------------------------------

SMALL_STEP_WORK = 100_000_000
"""Multiply-adds per forward pass (batch x parameters) below which extra intra-op threads do not pay.

Measured on a 2-core CPU: the default head (batch 32, 1.6 M) trains as fast on 1 thread as on 2
when the machine is idle and 4x slower on 2 threads when another process competes for a core; a
191->512->1536 head (28 M) gains 1.4x from a second thread when idle and loses 1.6x under
contention. Above this size a run uses its whole share.
"""

_share = 0


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cpu_share(processes: int) -> int:
    """Each of ``processes`` training processes' share of the CPUs this one may use (at least 1)."""
    return max(1, available_cpus() // max(1, processes))


def set_cpu_share(threads: int) -> None:
    """This process's CPU share; OpenMP and MKL in processes it starts get the same (by environment)."""
    global _share
    _share = max(1, threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(_share)


def threads_for(batch_size: int, parameters: int, device: torch.device) -> int:
    """Intra-op threads for a run: 1 for small steps on a CPU, else the process's share."""
    share = _share or cpu_share(1)
    if device.type == "cpu" and batch_size * parameters < SMALL_STEP_WORK:
        return 1
    return share


def use_threads(n: int) -> None:
    """torch (and with it OpenMP and MKL) uses ``n`` intra-op threads in this process."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def free_bytes(device: torch.device) -> int:
    """Memory free for a run on a device: a CUDA device's free memory, else the machine's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
