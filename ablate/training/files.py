"""Data files (.npz, .pt, .parquet) read and checked with numpy, before torch is imported: a mistake in a file is
one line naming the file, the array and the row, at once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ablate.errors import AblateError

SUFFIXES = (".npz", ".pt", ".parquet")


@dataclass(frozen=True)
class Arrays:
    """A data file's checked arrays: pocket ``[N, Dp]`` and ligand ``[N, Dl]`` (float32), ligand and pocket ids
    ``[N]`` (int64; rows with identical vectors share one where the file gives none), its split labels if any."""

    pocket: np.ndarray
    ligand: np.ndarray
    ligand_id: np.ndarray
    pocket_id: np.ndarray
    split: np.ndarray | None


SPLIT_NAMES = ("train", "val", "test")


def read(path: str | Path, what: str = "data file") -> Arrays:
    """A data file's arrays, checked (numpy only; a .pt file needs torch), cached by path, size and time, so that a
    command can check its files before it imports torch and then train on them without reading them again."""
    p = Path(path)
    key = _key(p)
    if key is not None and key in _READ:
        return _READ[key]
    arrays = _read(p, what)
    if key is not None:
        while len(_READ) >= 2:  # a data file and a test file: a large file is not kept twice
            _READ.pop(next(iter(_READ)))
        _READ[key] = arrays
    return arrays


def check(spec: Any) -> None:
    """Read and check the files a data spec names (``source``, ``test_source``); the synthetic data needs none."""
    if spec.source != "synthetic":
        read(spec.source)
    if spec.test_source is not None:
        read(spec.test_source, "test data file")


def _key(p: Path) -> tuple[str, int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return str(p.resolve()), st.st_size, st.st_mtime_ns


_READ: dict[tuple[str, int, int], Arrays] = {}


def _read(p: Path, what: str) -> Arrays:
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
    checked = _validated(p, arrays)
    labels = _split_labels(p, arrays["split"], len(checked.pocket)) if "split" in arrays else None
    return Arrays(checked.pocket, checked.ligand, checked.ligand_id, checked.pocket_id, labels)


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
    import torch

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
    return {k: (_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in obj.items()}


def _numpy(t: Any) -> np.ndarray:
    """A tensor as numpy; bfloat16 and float16 become float32 (numpy has no bfloat16)."""
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return np.asarray(t.detach().cpu().numpy())


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


def _validated(p: Path, arrays: dict[str, Any]) -> Arrays:
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
    return Arrays(pocket, ligand, ids["ligand_id"].astype(np.int64), ids["pocket_id"].astype(np.int64), None)


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
