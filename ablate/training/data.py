"""Paired embeddings: the built-in synthetic benchmark and the data files (.npz, .pt, .parquet) checked as they load."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ablate.specs import SyntheticSpec
from ablate.training import files


@dataclass(frozen=True)
class PairedEmbeddings:
    """Pocket features ``[N, Dp]``, ligand embeddings ``[N, Dl]``, ligand ids and pocket ids ``[N]`` (int64).

    Row i pairs pocket i with ligand i; rows with the same ligand id hold the same ligand, rows with
    the same pocket id the same pocket (several structures of one target, say). Without pocket ids,
    identical pocket rows share one.
    """

    pocket: Tensor
    ligand: Tensor
    ligand_id: Tensor
    pocket_id: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = self.pocket.shape[0]
        if self.pocket_id is None:
            rows = self.pocket.detach().cpu().numpy()
            ids = np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1) if n else np.zeros(0)
            object.__setattr__(self, "pocket_id", torch.from_numpy(ids.astype(np.int64)).to(self.pocket.device))
        if self.pocket.ndim != 2 or self.ligand.ndim != 2 or self.ligand_id.ndim != 1 or self.pocket_id.ndim != 1:
            raise ValueError("pocket and ligand must be 2-D, ligand_id and pocket_id 1-D")
        if self.ligand.shape[0] != n or self.ligand_id.shape[0] != n or self.pocket_id.shape[0] != n:
            raise ValueError(
                f"row counts differ: pocket {n}, ligand {self.ligand.shape[0]}, "
                f"ligand_id {self.ligand_id.shape[0]}, pocket_id {self.pocket_id.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.pocket.shape[0])

    @property
    def pocket_dim(self) -> int:
        """Width of the pocket features."""
        return int(self.pocket.shape[1])

    @property
    def ligand_dim(self) -> int:
        """Width of the ligand embeddings."""
        return int(self.ligand.shape[1])

    def subset(self, index: Tensor) -> PairedEmbeddings:
        """The rows at ``index``."""
        return PairedEmbeddings(self.pocket[index], self.ligand[index], self.ligand_id[index], self.pocket_id[index])

    def to(self, device: torch.device | str) -> PairedEmbeddings:
        """The same pairs on another device."""
        return PairedEmbeddings(
            self.pocket.to(device), self.ligand.to(device), self.ligand_id.to(device), self.pocket_id.to(device)
        )

    def fingerprint(self) -> str:
        """A short content hash, logged with every run so results name their data."""
        h = hashlib.sha256()
        for t in (self.pocket, self.ligand, self.ligand_id, self.pocket_id):
            a = t.detach().cpu().contiguous().numpy()
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()[:12]

    def save(self, path: str | Path) -> None:
        """Write the pairs as .npz (arrays pocket, ligand, ligand_id, pocket_id)."""
        np.savez(
            path,
            pocket=self.pocket.cpu().numpy(),
            ligand=self.ligand.cpu().numpy(),
            ligand_id=self.ligand_id.cpu().numpy(),
            pocket_id=self.pocket_id.cpu().numpy(),
        )


# --------------------------------------------------------------------------------------
# Loading files
# --------------------------------------------------------------------------------------


def load_pairs(path: str | Path) -> PairedEmbeddings:
    """Read pairs from .npz, .pt (a dict) or .parquet with arrays pocket, ligand [, ligand_id, pocket_id].

    ``ligand_id`` and ``pocket_id`` are optional (rows with identical ligand, or pocket, vectors then
    share an id) and may hold integers or strings. Any problem ends in one AblateError naming the
    file and the array. A ``split`` array is checked but not returned (see ``load_split``).
    """
    return load_labelled(path)[0]


def load_labelled(path: str | Path, what: str = "data file") -> tuple[PairedEmbeddings, np.ndarray | None]:
    """The pairs of a data file as tensors and its own split labels (``"train"``, ``"val"``, ``"test"``), if any."""
    arrays = files.read(path, what)
    pairs = PairedEmbeddings(*(torch.from_numpy(a) for a in (arrays.pocket, arrays.ligand, arrays.ligand_id,
                                                               arrays.pocket_id)))
    return pairs, arrays.split


# --------------------------------------------------------------------------------------
# The synthetic benchmark
# --------------------------------------------------------------------------------------


def synthetic_pairs(spec: SyntheticSpec | None = None, seed: int = 0) -> PairedEmbeddings:
    """The built-in benchmark: the same pairs for the same spec and seed.

    Ligands come in families that share a latent (near-duplicates: false negatives for
    InfoNCE); some ligands bind several pockets (shared ligand ids); ligand embeddings have
    norms drawn independently of the pairing (which MSE spends capacity on); pocket features are
    a noisy non-linear function of the ligand latent, with pocket-specific variation.
    """
    s = spec or SyntheticSpec()
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    n_fam = min(s.n_families, s.n_ligands)
    centers = randn(n_fam, s.latent_dim)
    family = torch.randperm(s.n_ligands, generator=g) % n_fam
    z = centers[family] + s.family_spread * randn(s.n_ligands, s.latent_dim)

    lig_a = randn(s.latent_dim, s.ligand_dim) / math.sqrt(s.latent_dim)
    lig_b = randn(s.latent_dim, s.ligand_dim) / math.sqrt(s.latent_dim)
    direction = torch.nn.functional.normalize(z @ lig_a + 0.5 * torch.tanh(z @ lig_b), dim=1)
    norms = torch.exp(s.norm_spread * randn(s.n_ligands, 1)) * math.sqrt(s.ligand_dim) / 4
    ligand_vec = direction * norms

    extra = torch.randint(2, s.max_pockets_per_ligand + 1, (s.n_ligands,), generator=g)
    multi = torch.rand(s.n_ligands, generator=g) < s.multi_pocket_fraction
    counts = torch.where(multi & (s.max_pockets_per_ligand > 1), extra, torch.ones_like(extra))
    ligand_of_pocket = torch.repeat_interleave(torch.arange(s.n_ligands), counts)
    n = ligand_of_pocket.shape[0]

    hidden = 2 * s.pocket_dim
    w1 = randn(s.latent_dim, hidden) / math.sqrt(s.latent_dim)
    w2 = randn(hidden, s.pocket_dim) / math.sqrt(hidden)
    u = z[ligand_of_pocket] + s.pocket_noise * randn(n, s.latent_dim)
    pocket = torch.nn.functional.gelu(u @ w1) @ w2 + 0.1 * randn(n, s.pocket_dim)

    order = torch.randperm(n, generator=g)
    return PairedEmbeddings(
        pocket[order].contiguous(),
        ligand_vec[ligand_of_pocket][order].contiguous(),
        ligand_of_pocket[order].contiguous(),
        family[ligand_of_pocket][order].contiguous(),  # a family's binding site is one pocket with several actives
    )
