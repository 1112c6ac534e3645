"""Splits: a data spec's train, validation and test pairs (ligand-, pocket-disjoint or random, or a file's own
``split`` array), the rows each came from (``split.json``) and how they were cut."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ablate.errors import AblateError
from ablate.specs import DataSpec
from ablate.training.data import PairedEmbeddings, load_labelled, synthetic_pairs
from ablate.training.files import SPLIT_NAMES


@dataclass(frozen=True)
class Split:
    """The train, validation and test pairs of a data spec, the rows each came from, and how they were cut.

    ``rows`` holds row indices into the data file (for ``test`` into the test file when the spec
    names one): with the data, ``split.json`` and a run's model every test number can be recomputed.
    """

    train: PairedEmbeddings
    val: PairedEmbeddings
    test: PairedEmbeddings
    rows: dict[str, list[int]]
    how: str
    """One phrase: "ligand-disjoint split, 60/20/20 %", "the data file's own split", ..."""

    def fingerprint(self) -> str:
        """A content hash of the three parts (logged with every run, so results name their data)."""
        return "+".join(part.fingerprint() for part in (self.train, self.val, self.test))

    def document(self) -> dict[str, list[int]]:
        """``split.json``: the row indices of each part."""
        return {name: self.rows[name] for name in SPLIT_NAMES}


def split_rows(data: PairedEmbeddings, val_fraction: float = 0.2, *, test_fraction: float = 0.0, seed: int = 0,
               by: str = "ligand") -> dict[str, Tensor]:
    """Row indices of train, val and test. ``by="ligand"`` (``"pocket"``) keeps every ligand (pocket) in one part
    only; ``"random"`` splits rows. Validation takes the first shuffled units up to its fraction, test the next."""
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1 or (name == "val_fraction" and fraction == 0):
            raise AblateError(f"{name} must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    if by == "random":
        perm = torch.randperm(n, generator=g)
        n_val = max(1, round(n * val_fraction))
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
        parts = {"val": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}
    elif by in ("ligand", "pocket"):
        ids = (data.ligand_id if by == "ligand" else data.pocket_id).cpu()
        uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        order = torch.randperm(len(uniq), generator=g)
        cum = torch.cumsum(counts[order], 0)
        n_val = int(torch.searchsorted(cum, torch.tensor(n * val_fraction)).item()) + 1
        n_test = 0
        if test_fraction > 0:
            n_test = int(torch.searchsorted(cum, torch.tensor(n * (val_fraction + test_fraction))).item()) + 1 - n_val
            n_test = max(1, n_test)
        part = torch.zeros(len(uniq), dtype=torch.long)  # 0 train, 1 val, 2 test
        part[order[:n_val]] = 1
        part[order[n_val:n_val + n_test]] = 2
        of_row = part[inverse]
        parts = {name: (of_row == code).nonzero().flatten() for code, name in enumerate(SPLIT_NAMES)}
    else:
        raise AblateError(f"unknown split {by!r}; use 'ligand', 'pocket' or 'random'")
    wanted = ("train", "val", "test") if test_fraction > 0 else ("train", "val")
    if any(len(parts[name]) == 0 for name in wanted):
        sizes = ", ".join(f"{name} {len(parts[name])}" for name in wanted)
        raise AblateError(
            f"a {by} split of {n} pairs with val_fraction {val_fraction}"
            + (f" and test_fraction {test_fraction}" if test_fraction > 0 else "")
            + f" leaves a part empty ({sizes}); use more data or other fractions"
        )
    return parts


def split(
    data: PairedEmbeddings, val_fraction: float = 0.2, seed: int = 0, by: str = "ligand"
) -> tuple[PairedEmbeddings, PairedEmbeddings]:
    """(train, val) as ``split_rows`` cuts them without a test part (a data spec's three parts: ``load_split``)."""
    rows = split_rows(data, val_fraction, seed=seed, by=by)
    return data.subset(rows["train"]), data.subset(rows["val"])


_CACHE: dict[str, Split] = {}


def load_split(spec: DataSpec) -> Split:
    """The train, validation and test pairs a data spec names; cached per process, so trials share one load."""
    key = spec.model_dump_json()
    if key not in _CACHE:
        _CACHE[key] = _make_split(spec)
    return _CACHE[key]


def _make_split(spec: DataSpec) -> Split:
    labels = None
    if spec.source == "synthetic":
        data = synthetic_pairs(spec.synthetic, seed=spec.seed)
    else:
        data, labels = load_labelled(spec.source)
    external = None
    if spec.test_source is not None:
        if spec.test_source == spec.source:
            raise AblateError(f"data.test_source (--test-data) {spec.test_source} is the training data itself; "
                              "name another file, or leave it out to hold out a test split of the data")
        external = _external_test(spec.test_source)
    if labels is not None:
        for name in ("train", "val"):
            if not (labels == name).any():
                raise AblateError(f"{spec.source}: its 'split' array has no {name!r} rows; a run needs pairs to "
                                  "train on and pairs to select its epoch on")
        if external is not None and (labels == "test").any():
            raise AblateError(f"{spec.source}: its 'split' array has test rows and data.test_source "
                              f"({spec.test_source}) names a test set too; drop one of them")
        if external is None and not (labels == "test").any():
            raise AblateError(f"{spec.source}: its 'split' array has no 'test' rows; label some rows \"test\" "
                              "or name a test set with --test-data FILE (data.test_source)")
        rows = {name: torch.from_numpy(np.flatnonzero(labels == name)) for name in SPLIT_NAMES}
        how = "the data file's own split"
    else:
        test_fraction = 0.0 if external is not None else spec.test_fraction
        rows = split_rows(data, spec.val_fraction, test_fraction=test_fraction, seed=spec.seed, by=spec.split)
        shares = [len(rows[name]) / len(data) for name in SPLIT_NAMES if len(rows[name])]
        how = f"{spec.split}-disjoint split" if spec.split != "random" else "random split"
        how += ", " + "/".join(f"{100 * s:.0f}" for s in shares) + " %"
    if external is not None:
        test_data, rows["test"] = external
        if (test_data.pocket_dim, test_data.ligand_dim) != (data.pocket_dim, data.ligand_dim):
            raise AblateError(
                f"{spec.test_source}: its pairs are {test_data.pocket_dim} -> {test_data.ligand_dim} wide but "
                f"{spec.source}'s are {data.pocket_dim} -> {data.ligand_dim}; a test set must match the training data")
        how += f"; test pairs from {spec.test_source}"
    else:
        test_data = data.subset(rows["test"])
    train, val = data.subset(rows["train"]), data.subset(rows["val"])
    shared = _seen_ligands(test_data, train, val)
    if shared:
        how += f"; {shared} of {len(test_data)} test pairs have a ligand that training or validation also has"
    return Split(train, val, test_data, {name: [int(i) for i in rows[name]] for name in SPLIT_NAMES}, how)


def _external_test(path: str) -> tuple[PairedEmbeddings, Tensor]:
    """A test file's pairs and their row indices in it: all its rows, or those its own 'split' array labels test."""
    data, labels = load_labelled(path, "test data file")
    if labels is None:
        return data, torch.arange(len(data))
    rows = torch.from_numpy(np.flatnonzero(labels == "test"))
    if len(rows) == 0:
        raise AblateError(f"{path}: the test data file has a 'split' array with no 'test' rows; label the rows to "
                          "score \"test\", or drop the array to score every row")
    return data.subset(rows), rows


def _seen_ligands(test: PairedEmbeddings, *others: PairedEmbeddings) -> int:
    """How many test pairs have a ligand vector that also appears in the other parts (0 for a disjoint split)."""
    seen = {hash(row.tobytes()) for part in others for row in part.ligand.detach().cpu().numpy()}
    return sum(hash(row.tobytes()) in seen for row in test.ligand.detach().cpu().numpy())


_FINGERPRINTS: dict[str, str] = {}


def split_fingerprint(spec: DataSpec) -> str:
    """A content hash of the train, validation and test pairs a data spec names, computed once per process."""
    key = spec.model_dump_json()
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = load_split(spec).fingerprint()
    return _FINGERPRINTS[key]
