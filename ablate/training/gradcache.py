"""GradCache (Gao et al. 2021): the gradient of a batch-level loss accumulated over micro-batches.

A contrastive loss couples every pair in a batch, so a batch too large for memory cannot simply be
split: each micro-batch's loss would see only its own negatives. GradCache embeds the micro-batches
without a graph, computes the loss and its gradient with respect to the embeddings over the whole
batch, then re-embeds each micro-batch (replaying its random state, so dropout noise is the same)
and back-propagates its slice of that gradient. The parameter gradients equal those of one large
batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def grad_cache(
    model: Callable[[Tensor], Tensor],
    criterion: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    x: Tensor,
    y: Tensor,
    ligand_ids: Tensor | None,
    micro_batch: int,
    *,
    dim: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    backward: Callable[[Tensor], None] = Tensor.backward,
    generators: Sequence[torch.Generator] = (),
) -> tuple[Tensor, Tensor]:
    """Accumulate the gradient of a batch-level loss over micro-batches (GradCache).

    1. embed every micro-batch without a graph, keeping each one's RNG state (dropout);
    2. compute the loss over the whole batch on the cached embeddings and back-propagate it to
       them (and to the loss's own parameters, e.g. a learnable temperature);
    3. re-embed each micro-batch with the same RNG state and back-propagate its slice of the
       cached gradient. The parameter gradients equal those of one large batch.

    ``dim`` is the batch dimension (1 for an array's [K, B, D]); ``generators`` are further random streams
    the model draws from (the members' dropout), replayed too. Returns the loss (detached) and the
    embeddings.
    """
    chunks = x.split(micro_batch, dim=dim)
    device = x.device
    states = []
    reps = []
    with torch.no_grad():
        for xc in chunks:
            states.append((rng_state(device), [g.get_state() for g in generators]))
            with autocast():
                reps.append(model(xc))
    cached = torch.cat(reps, dim=dim).to(torch.promote_types(reps[0].dtype, torch.float32)).requires_grad_()
    loss = criterion(cached, y, ligand_ids)
    backward(loss)
    assert cached.grad is not None
    for xc, state, grad in zip(chunks, states, cached.grad.split(micro_batch, dim=dim), strict=True):
        set_rng_state(device, state[0])
        for g, saved in zip(generators, state[1], strict=True):
            g.set_state(saved)
        with autocast():
            out = model(xc)
        out.backward(grad.to(out.dtype))
    return loss.detach(), cached.detach()


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU random state and the device's (CUDA, MPS), which dropout draws from."""
    dev = None
    if device.type == "cuda":
        dev = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        dev = torch.mps.get_rng_state()
    return torch.get_rng_state(), dev


def set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    """Put back a state taken by ``rng_state``."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        if device.type == "cuda":
            torch.cuda.set_rng_state(state[1], device)
        else:
            torch.mps.set_rng_state(state[1])
