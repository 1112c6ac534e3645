"""Small shared pieces for the tests: tiny data specs, a CLI runner, and a model that breaks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ablate.specs import DataSpec, RunSpec, SyntheticSpec

TINY = SyntheticSpec(n_ligands=60, n_families=12, pocket_dim=8, ligand_dim=12, latent_dim=4)
"""About 100 pairs: fast enough to train for a few epochs in every test."""


def tiny_run(**fields: Any) -> RunSpec:
    """A RunSpec on the tiny synthetic data with a small head."""
    base: dict[str, Any] = {
        "epochs": 3,
        "batch_size": 16,
        "data": DataSpec(synthetic=TINY),
        "model": {"hidden": [16], "dropout": 0.0},
    }
    base.update(fields)
    return RunSpec.model_validate(base)


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
            ) -> tuple[int, str, str]:
    """Run `ablate ARGS` in this process; returns (exit code, stdout, stderr)."""
    from ablate.cli import main

    monkeypatch.setattr(sys, "argv", ["ablate", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0) if not isinstance(e.code, str) else 1
    out, err = capsys.readouterr()
    return code, out, err


class BreaksAfter(nn.Module):
    """A linear head whose output turns NaN once it has been called `calls` times in training."""

    def __init__(self, in_dim: int, out_dim: int, calls: int = 10):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)
        self.calls = calls
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        out = self.lin(x)
        return out * float("nan") if self.seen > self.calls else out


def breaks_after(in_dim: int, out_dim: int, calls: int = 10) -> nn.Module:
    """Factory for BreaksAfter (used by import path "support:breaks_after")."""
    return BreaksAfter(in_dim, out_dim, calls)


def ablate_command(*args: str) -> list[str]:
    """The argv of `ablate ARGS` in a fresh Python process."""
    return [sys.executable, "-m", "ablate", *args]


def two_layer(in_dim: int, out_dim: int, hidden: int = 12) -> nn.Module:
    """A user model (Linear, Tanh, Linear) given by import path "support:two_layer"."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


def wrapped_head(in_dim: int, out_dim: int, dropout: float = 0.3) -> nn.Module:
    """A user model that holds the built-in head (with dropout) inside its own module: it runs vmapped."""
    from ablate.training.models import ProjectionHead

    return nn.Sequential(ProjectionHead(in_dim, out_dim, (16,), dropout))


class DataDependent(nn.Module):
    """A model whose forward reads a value back to Python, which torch.func.vmap cannot trace."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out if float(out.sum()) > -1e30 else -out


def data_dependent(in_dim: int, out_dim: int) -> nn.Module:
    """Factory for DataDependent (import path "support:data_dependent")."""
    return DataDependent(in_dim, out_dim)


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """An MLflow tracking server on a free local port, its store in ``folder``; yields its URL once /health
    answers and stops its process group on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder / 'server.db'}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "the MLflow server did not answer"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def independent_retrieval(pred: torch.Tensor, ligand: torch.Tensor, ligand_id: torch.Tensor) -> dict[str, float]:
    """top-1, MRR and mean cosine from their definitions: each pocket ranks the distinct ligands (first row of
    each id) by cosine; its rank counts every other ligand scoring at least as high (ties pessimistic)."""
    first = {}
    for row, lid in enumerate(ligand_id.tolist()):
        first.setdefault(lid, row)
    gallery_ids = list(first)
    gallery = F.normalize(ligand[[first[g] for g in gallery_ids]].double(), dim=1)
    scores = F.normalize(pred.double(), dim=1) @ gallery.T
    ranks = []
    for i, lid in enumerate(ligand_id.tolist()):
        own = gallery_ids.index(lid)
        others = torch.cat([scores[i, :own], scores[i, own + 1:]])
        ranks.append(1 + int((others >= scores[i, own]).sum()))
    r = np.array(ranks, dtype=float)
    cos = F.cosine_similarity(pred.double(), ligand.double(), dim=1).mean().item()
    return {"top1": float((r == 1).mean()), "mrr": float((1 / r).mean()), "cosine": cos}
