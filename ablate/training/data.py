"""Paired embeddings: the built-in synthetic benchmark and the data files (.npz, .pt, .parquet) checked as they load."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ablate.errors import AblateError
from ablate.specs import SyntheticSpec

SUFFIXES = (".npz", ".pt", ".parquet")


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


SPLIT_NAMES = ("train", "val", "test")


def load_labelled(path: str | Path, what: str = "data file") -> tuple[PairedEmbeddings, np.ndarray | None]:
    """The pairs of a data file and its own split labels (``"train"``, ``"val"``, ``"test"`` per row), if any."""
    p = Path(path)
    if not p.is_file():
        either = ", or 'synthetic'" if what == "data file" else ""
        raise AblateError(f"{p}: no such {what} (give a .npz, .pt or .parquet file{either})")
    if p.suffix not in SUFFIXES:
        raise AblateError(f"{p}: unknown format {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        arrays = {".npz": _read_npz, ".pt": _read_pt, ".parquet": _read_parquet}[p.suffix](p)
    except AblateError:
        raise
    except Exception as e:  # a corrupt or foreign file
        first = (str(e).strip().splitlines() or [""])[0]
        raise AblateError(f"{p}: cannot read {p.suffix} file ({type(e).__name__}: {first})") from None
    pairs = _validated(p, arrays)
    labels = _split_labels(p, arrays["split"], len(pairs)) if "split" in arrays else None
    return pairs, labels


def _split_labels(p: Path, a: Any, n: int) -> np.ndarray:
    """A file's ``split`` array as strings, each "train", "val" or "test"; anything else is an error naming the row."""
    a = np.asarray(a)
    if a.ndim != 1 or len(a) != n:
        raise AblateError(f"{p}: array 'split' must be 1-D with one label per row ({n}), got shape {a.shape}")
    if a.dtype.kind not in "USO":
        raise AblateError(f"{p}: array 'split' must hold the strings \"train\", \"val\" or \"test\" "
                          f"(dtype {a.dtype})")
    labels = np.array([x.decode(errors="replace") if isinstance(x, bytes) else x for x in a.tolist()], dtype=object)
    bad = [i for i, x in enumerate(labels) if x not in SPLIT_NAMES]
    if bad:
        shown = "missing" if labels[bad[0]] is None else repr(labels[bad[0]])
        raise AblateError(f"{p}: array 'split' has {len(bad)} row(s) that are not \"train\", \"val\" or "
                          f"\"test\" (first: row {bad[0]}, {shown}); label every row")
    return labels.astype(str)


def _read_npz(p: Path) -> dict[str, Any]:
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _read_pt(p: Path) -> dict[str, Any]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text spans lines and offers unsafe loading: say it in our words
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = (f"it holds a {found.group(1)} object, which a safe load (weights_only) refuses" if found
               else "it is not a file that torch.save wrote, or it is damaged")
        raise AblateError(f"{p}: cannot load it safely: {why}; save the arrays as tensors in a dict, e.g. "
                          "torch.save({'pocket': torch.as_tensor(pocket), 'ligand': torch.as_tensor(ligand)}, "
                          f"'{p.name}')") from None
    if not isinstance(obj, dict):
        raise AblateError(f"{p}: expected a dict of arrays, got {type(obj).__name__}")
    return {k: (_numpy(v) if isinstance(v, Tensor) else np.asarray(v)) for k, v in obj.items()}


def _numpy(t: Tensor) -> np.ndarray:
    """A tensor as numpy; bfloat16 and float16 become float32 (numpy has no bfloat16)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def _read_parquet(p: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if col.null_count and name != "split":  # a missing label in 'split' is named by its own check
            row = int(np.flatnonzero(np.asarray(col.is_null().to_numpy(zero_copy_only=False)))[0])
            raise AblateError(f"{p}: column {name!r} has {col.null_count} empty (null) row(s) (first: row {row}); "
                              "drop or fill them")
        if hasattr(col, "flatten") and hasattr(col, "value_lengths"):
            lengths = np.asarray(col.value_lengths().to_numpy(zero_copy_only=False))
            if len(lengths) and (lengths != lengths[0]).any():
                bad = int(np.argmax(lengths != lengths[0]))
                raise AblateError(
                    f"{p}: column {name!r}: rows have different lengths "
                    f"(row {bad} has {lengths[bad]}, row 0 has {lengths[0]})"
                )
            flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
            width = int(lengths[0]) if len(lengths) else 0
            out[name] = flat.reshape(len(col), width) if width else flat.reshape(len(col), 0)
        else:
            out[name] = np.asarray(col.to_numpy(zero_copy_only=False))
    return out


def _validated(p: Path, arrays: dict[str, Any]) -> PairedEmbeddings:
    for name in ("pocket", "ligand"):
        if name not in arrays:
            raise AblateError(
                f"{p}: missing array {name!r} (found: {', '.join(sorted(arrays)) or 'none'}); "
                "the file needs arrays 'pocket' [N, Dp] and 'ligand' [N, Dl]"
            )
    pocket = _matrix(p, "pocket", arrays["pocket"])
    ligand = _matrix(p, "ligand", arrays["ligand"])
    if len(pocket) != len(ligand):
        raise AblateError(f"{p}: 'pocket' has {len(pocket)} rows but 'ligand' has {len(ligand)}")
    ids = {}
    for name, rows in (("ligand_id", ligand), ("pocket_id", pocket)):
        if name in arrays:
            ids[name] = _ids(p, name, np.asarray(arrays[name]), len(pocket))
        else:
            ids[name] = np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)
    return PairedEmbeddings(
        torch.from_numpy(pocket), torch.from_numpy(ligand), torch.from_numpy(ids["ligand_id"].astype(np.int64)),
        torch.from_numpy(ids["pocket_id"].astype(np.int64)),
    )


def _matrix(p: Path, name: str, a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iuf":
        raise AblateError(f"{p}: array {name!r} is not numeric (dtype {a.dtype}); store float values")
    if a.ndim != 2:
        raise AblateError(f"{p}: array {name!r} must be 2-D [rows, features], got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise AblateError(f"{p}: array {name!r} is empty (shape {a.shape})")
    bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
    if len(bad):
        first = ", ".join(str(i) for i in bad[:5])
        raise AblateError(
            f"{p}: array {name!r} has {len(bad)} row(s) with NaN or inf (first: {first}); "
            "drop or impute them"
        )
    big = np.flatnonzero((np.abs(a) > np.finfo(np.float32).max).any(axis=1))
    if len(big):
        first = ", ".join(str(i) for i in big[:5])
        raise AblateError(
            f"{p}: array {name!r} has {len(big)} row(s) with values beyond float32's range (first: {first}); "
            "rescale them (training runs in float32)"
        )
    return a.astype(np.float32)


def _ids(p: Path, name: str, a: np.ndarray, n: int) -> np.ndarray:
    if a.ndim != 1:
        raise AblateError(f"{p}: array {name!r} must be 1-D, got shape {a.shape}")
    if len(a) != n:
        raise AblateError(f"{p}: {name!r} has {len(a)} rows but 'pocket' has {n}")
    if a.dtype.kind in "USO":
        return np.unique(a.astype(str), return_inverse=True)[1].reshape(-1)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise AblateError(f"{p}: {name!r} must hold integers or strings, got fractional values")
        return a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise AblateError(f"{p}: {name!r} must hold integers or strings (dtype {a.dtype})")
    return a.astype(np.int64)


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
