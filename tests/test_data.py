"""File loaders, their error messages, the synthetic benchmark and the splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from ablate.errors import AblateError
from ablate.specs import DataSpec, SyntheticSpec
from ablate.training.data import PairedEmbeddings, load_pairs, synthetic_pairs
from ablate.training.splits import load_split, split, split_rows

FORMATS = ("npz", "pt", "parquet")

# --------------------------------------------------------------------------------------
# Writing files the way users do
# --------------------------------------------------------------------------------------


def write(path: Path, arrays: dict[str, Any]) -> Path:
    """Write arrays as .npz, as a .pt dict of tensors (lists stay lists) or as parquet list columns."""
    if path.suffix == ".npz":
        np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    elif path.suffix == ".pt":
        torch.save({k: torch.from_numpy(v) if isinstance(v, np.ndarray) and v.dtype.kind in "iuf" else v
                    for k, v in arrays.items()}, path)
    elif path.suffix == ".parquet":
        columns = {}
        for k, v in arrays.items():
            v = np.asarray(v)
            columns[k] = pa.array([list(row) for row in v]) if v.ndim == 2 else pa.array(v.tolist())
        pq.write_table(pa.table(columns), path)
    else:
        path.write_text("pocket,ligand\n1,2\n")
    return path


def _arrays(n: int = 6, dp: int = 5, dl: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pocket": rng.standard_normal((n, dp)).astype(np.float32),
        "ligand": rng.standard_normal((n, dl)).astype(np.float32),
        "ligand_id": np.array([10, 11, 10, 12, 13, 11][:n], dtype=np.int64),
    }


def _same_pattern(ids: np.ndarray) -> np.ndarray:
    return ids[:, None] == ids[None, :]


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    arrays = _arrays()
    data = load_pairs(write(tmp_path / f"pairs.{fmt}", arrays))
    assert isinstance(data, PairedEmbeddings)
    assert data.pocket.dtype == torch.float32 and data.ligand.dtype == torch.float32
    assert data.ligand_id.dtype == torch.int64
    np.testing.assert_array_equal(data.pocket.numpy(), arrays["pocket"])
    np.testing.assert_array_equal(data.ligand.numpy(), arrays["ligand"])
    np.testing.assert_array_equal(data.ligand_id.numpy(), arrays["ligand_id"])
    assert (data.pocket_dim, data.ligand_dim, len(data)) == (5, 4, 6)


def test_round_trip_through_save(tmp_path: Path) -> None:
    arrays = _arrays(seed=1)
    first = load_pairs(write(tmp_path / "a.npz", arrays))
    first.save(tmp_path / "b.npz")
    second = load_pairs(tmp_path / "b.npz")
    assert second.fingerprint() == first.fingerprint()
    assert torch.equal(second.ligand_id, first.ligand_id)


def test_float64_and_integer_features_become_float32(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["pocket"] = np.arange(30, dtype=np.int32).reshape(6, 5)
    arrays["ligand"] = arrays["ligand"].astype(np.float64)
    data = load_pairs(write(tmp_path / "pairs.npz", arrays))
    assert data.pocket.dtype == torch.float32
    np.testing.assert_array_equal(data.pocket.numpy(), np.arange(30, dtype=np.float32).reshape(6, 5))


@pytest.mark.parametrize("fmt", FORMATS)
def test_string_ligand_ids_become_ints(tmp_path: Path, fmt: str) -> None:
    arrays = _arrays()
    names = np.array(["aspirin", "caffeine", "aspirin", "zinc-7", "ATP", "caffeine"])
    arrays["ligand_id"] = names.tolist() if fmt == "pt" else names  # a .pt holds a list of str
    data = load_pairs(write(tmp_path / f"pairs.{fmt}", arrays))
    ids = data.ligand_id.numpy()
    assert data.ligand_id.dtype == torch.int64
    np.testing.assert_array_equal(_same_pattern(ids), _same_pattern(names))  # same name <=> same id
    assert len(np.unique(ids)) == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_ligand_id_identical_ligand_rows_share_an_id(tmp_path: Path, fmt: str) -> None:
    arrays = _arrays(n=6)
    lig = arrays["ligand"]
    lig[3] = lig[0]
    lig[5] = lig[0]
    lig[4] = lig[1]
    del arrays["ligand_id"]
    data = load_pairs(write(tmp_path / f"pairs.{fmt}", arrays))
    ids = data.ligand_id.numpy()
    identical = np.array([[np.array_equal(a, b) for b in lig] for a in lig])
    np.testing.assert_array_equal(_same_pattern(ids), identical)
    assert len(np.unique(ids)) == 3


def test_float_ligand_ids_holding_integers_are_accepted(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["ligand_id"] = arrays["ligand_id"].astype(np.float64)
    data = load_pairs(write(tmp_path / "pairs.npz", arrays))
    np.testing.assert_array_equal(data.ligand_id.numpy(), [10, 11, 10, 12, 13, 11])


# --------------------------------------------------------------------------------------
# Bad inputs: one AblateError naming the file, the array and the problem
# --------------------------------------------------------------------------------------


def _error(path: Path) -> str:
    with pytest.raises(AblateError) as err:
        load_pairs(path)
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("missing", ["pocket", "ligand"])
def test_missing_array(tmp_path: Path, fmt: str, missing: str) -> None:
    arrays = _arrays()
    del arrays[missing]
    message = _error(write(tmp_path / f"pairs.{fmt}", arrays))
    assert f"missing array '{missing}'" in message


@pytest.mark.parametrize("fmt", ["npz", "pt"])  # a parquet table cannot hold columns of different lengths
def test_mismatched_lengths(tmp_path: Path, fmt: str) -> None:
    arrays = _arrays()
    arrays["ligand"] = arrays["ligand"][:4]
    message = _error(write(tmp_path / f"pairs.{fmt}", arrays))
    assert "'pocket' has 6 rows" in message and "'ligand' has 4" in message


def test_mismatched_ligand_id_length(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["ligand_id"] = arrays["ligand_id"][:3]
    message = _error(write(tmp_path / "pairs.npz", arrays))
    assert "'ligand_id' has 3 rows" in message and "6" in message


@pytest.mark.parametrize("shape", [(6,), (6, 5, 1)])
def test_wrong_rank(tmp_path: Path, shape: tuple[int, ...]) -> None:
    arrays = _arrays()
    arrays["pocket"] = np.zeros(shape, dtype=np.float32)
    message = _error(write(tmp_path / "pairs.npz", arrays))
    assert "'pocket'" in message and "2-D" in message and str(shape) in message


def test_wrong_rank_ligand_id(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["ligand_id"] = arrays["ligand_id"].reshape(6, 1)
    message = _error(write(tmp_path / "pairs.npz", arrays))
    assert "'ligand_id'" in message and "1-D" in message


@pytest.mark.parametrize("fmt", ["npz", "pt"])
def test_empty(tmp_path: Path, fmt: str) -> None:
    arrays = {"pocket": np.zeros((0, 5), np.float32), "ligand": np.zeros((0, 4), np.float32)}
    message = _error(write(tmp_path / f"pairs.{fmt}", arrays))
    assert "'pocket'" in message and "empty" in message


def test_empty_feature_width(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["ligand"] = np.zeros((6, 0), np.float32)
    message = _error(write(tmp_path / "pairs.npz", arrays))
    assert "'ligand'" in message and "empty" in message


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_non_numeric(tmp_path: Path, fmt: str) -> None:
    arrays = _arrays()
    arrays["ligand"] = np.array([["a", "b"]] * 6) if fmt == "npz" else np.array(["CCO"] * 6)
    message = _error(write(tmp_path / f"pairs.{fmt}", arrays))
    assert "'ligand'" in message and "not numeric" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_inf_rows_are_counted_and_located(tmp_path: Path, fmt: str) -> None:
    arrays = _arrays(n=6)
    arrays["ligand"][2, 1] = np.nan
    arrays["ligand"][4, 0] = np.inf
    arrays["ligand"][5, :] = -np.inf
    message = _error(write(tmp_path / f"pairs.{fmt}", arrays))
    assert "'ligand'" in message
    assert "3 row(s) with NaN or inf" in message
    assert "first: 2, 4, 5" in message


def test_many_nan_rows_list_the_first_indices(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pocket = rng.standard_normal((40, 3)).astype(np.float32)
    bad = [3, 8, 9, 17, 20, 31, 39]
    pocket[bad, 0] = np.nan
    arrays = {"pocket": pocket, "ligand": rng.standard_normal((40, 2)).astype(np.float32)}
    message = _error(write(tmp_path / "pairs.npz", arrays))
    assert "'pocket'" in message and "7 row(s)" in message and "first: 3, 8, 9, 17, 20" in message


def test_fractional_ligand_ids(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["ligand_id"] = np.array([0.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    message = _error(write(tmp_path / "pairs.npz", arrays))
    assert "'ligand_id'" in message and "fractional" in message


def test_ragged_parquet_column(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"pocket": pa.array([[1.0, 2.0], [3.0], [4.0, 5.0]]),
                             "ligand": pa.array([[1.0], [2.0], [3.0]])}), path)
    message = _error(path)
    assert "'pocket'" in message and "row 1" in message


def test_pt_that_is_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "pairs.pt"
    torch.save(torch.zeros(3, 2), path)
    message = _error(path)
    assert "dict" in message


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.npz"
    path.write_bytes(b"not a zip file at all")
    message = _error(path)
    assert "cannot read .npz" in message


def test_unknown_suffix(tmp_path: Path) -> None:
    message = _error(write(tmp_path / "pairs.csv", {}))
    assert "'.csv'" in message
    for suffix in (".npz", ".pt", ".parquet"):
        assert suffix in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "pairs.npz"
    with pytest.raises(AblateError) as err:
        load_pairs(path)
    assert str(path) in str(err.value) and "no such data file" in str(err.value)


# --------------------------------------------------------------------------------------
# The synthetic benchmark
# --------------------------------------------------------------------------------------

# every field pinned, so that tuning the defaults does not move these tests
SMALL = SyntheticSpec(n_ligands=200, n_families=20, pocket_dim=24, ligand_dim=32, latent_dim=8, family_spread=0.3,
                      multi_pocket_fraction=0.3, max_pockets_per_ligand=4, pocket_noise=0.8, norm_spread=0.6)


def _unique_ligands(data: PairedEmbeddings) -> tuple[np.ndarray, np.ndarray]:
    """One row per ligand id (the first), and the ids."""
    ids = data.ligand_id.numpy()
    first: dict[int, int] = {}
    for row, i in enumerate(ids):
        first.setdefault(int(i), row)
    return data.ligand.numpy()[list(first.values())].astype(np.float64), np.array(list(first))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _nn_and_mean_cosine(x: np.ndarray) -> tuple[float, float]:
    c = _unit(x) @ _unit(x).T
    off = ~np.eye(len(c), dtype=bool)
    np.fill_diagonal(c, -np.inf)
    return float(c.max(axis=1).mean()), float(c[off].mean())


def test_synthetic_is_deterministic_per_seed() -> None:
    a, b, c = synthetic_pairs(SMALL, seed=3), synthetic_pairs(SMALL, seed=3), synthetic_pairs(SMALL, seed=4)
    for name in ("pocket", "ligand", "ligand_id"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a) != len(c) or not torch.equal(a.pocket, c.pocket)


def test_synthetic_dims_follow_the_spec() -> None:
    for spec in (SMALL, SyntheticSpec()):
        data = synthetic_pairs(spec, seed=0)
        assert data.pocket.shape[1] == spec.pocket_dim and data.ligand.shape[1] == spec.ligand_dim
        assert data.pocket.dtype == torch.float32 and data.ligand.dtype == torch.float32
        counts = np.bincount(data.ligand_id.numpy())
        assert len(counts) == spec.n_ligands and counts.min() >= 1  # every ligand binds some pocket
        assert counts.max() <= spec.max_pockets_per_ligand
        assert len(data) == counts.sum()
        assert torch.isfinite(data.pocket).all() and torch.isfinite(data.ligand).all()


def test_synthetic_rows_of_one_ligand_hold_the_same_vector() -> None:
    data = synthetic_pairs(SMALL, seed=1)
    lig, ids = data.ligand.numpy(), data.ligand_id.numpy()
    for i in np.unique(ids):
        rows = lig[ids == i]
        assert (rows == rows[0]).all()


def test_synthetic_has_shared_ligands() -> None:
    spec = SyntheticSpec(n_ligands=400, multi_pocket_fraction=0.3, max_pockets_per_ligand=4)
    counts = np.bincount(synthetic_pairs(spec, seed=0).ligand_id.numpy())
    shared = np.mean(counts > 1)
    assert 0.2 < shared < 0.4  # about multi_pocket_fraction of the ligands bind several pockets
    none = np.bincount(synthetic_pairs(spec.model_copy(update={"multi_pocket_fraction": 0.0}), seed=0)
                       .ligand_id.numpy())
    assert (none == 1).all()


def test_synthetic_has_family_structure() -> None:
    # families are only visible through similarity: with ~7 ligands per family, each ligand's nearest
    # neighbour is far more similar than a typical pair, and more so than without shared families
    spec = SyntheticSpec(n_ligands=420, n_families=60, family_spread=0.3)
    lig, _ = _unique_ligands(synthetic_pairs(spec, seed=0))
    nn, mean = _nn_and_mean_cosine(lig)
    assert nn > mean + 0.6
    solo, _ = _unique_ligands(synthetic_pairs(spec.model_copy(update={"n_families": spec.n_ligands}), seed=0))
    nn_solo, _ = _nn_and_mean_cosine(solo)
    assert nn > nn_solo + 0.1


def test_synthetic_ligand_norms_vary() -> None:
    lig, _ = _unique_ligands(synthetic_pairs(SyntheticSpec(norm_spread=0.6), seed=0))
    norms = np.linalg.norm(lig, axis=1)
    assert norms.std() / norms.mean() > 0.3
    flat, _ = _unique_ligands(synthetic_pairs(SyntheticSpec(norm_spread=0.0), seed=0))
    flat_norms = np.linalg.norm(flat, axis=1)
    assert flat_norms.std() / flat_norms.mean() < 1e-5


def test_synthetic_pockets_carry_their_ligand() -> None:
    data = synthetic_pairs(SMALL, seed=2)
    pu = _unit(data.pocket.numpy().astype(np.float64))
    ids = data.ligand_id.numpy()
    c = pu @ pu.T
    same = _same_pattern(ids) & ~np.eye(len(ids), dtype=bool)
    diff = ~_same_pattern(ids)
    assert same.sum() > 20
    assert c[same].mean() > c[diff].mean() + 0.2


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def _tagged(seed: int = 0) -> PairedEmbeddings:
    """Synthetic pairs whose pocket column 0 holds the row number, so splits can be traced back."""
    data = synthetic_pairs(SMALL, seed=seed)
    pocket = data.pocket.clone()
    pocket[:, 0] = torch.arange(len(data), dtype=torch.float32)
    return PairedEmbeddings(pocket, data.ligand, data.ligand_id)


def _rows(part: PairedEmbeddings) -> np.ndarray:
    return part.pocket[:, 0].numpy().astype(np.int64)


def _check_partition(data: PairedEmbeddings, train: PairedEmbeddings, val: PairedEmbeddings) -> None:
    rows = np.concatenate([_rows(train), _rows(val)])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(data)))
    for part in (train, val):  # rows keep their ligand and ligand id
        r = _rows(part)
        assert torch.equal(part.ligand_id, data.ligand_id[r])
        assert torch.equal(part.ligand, data.ligand[r])


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_ligand_split_is_disjoint_and_near_the_fraction(fraction: float) -> None:
    data = _tagged()
    train, val = split(data, fraction, seed=0, by="ligand")
    _check_partition(data, train, val)
    assert set(train.ligand_id.tolist()).isdisjoint(val.ligand_id.tolist())
    assert abs(len(val) / len(data) - fraction) < 0.03


def test_ligand_split_is_deterministic() -> None:
    data = _tagged()
    a, b, c = split(data, 0.2, seed=5), split(data, 0.2, seed=5), split(data, 0.2, seed=6)
    np.testing.assert_array_equal(_rows(a[1]), _rows(b[1]))
    np.testing.assert_array_equal(_rows(a[0]), _rows(b[0]))
    assert set(_rows(a[1])) != set(_rows(c[1]))


def test_ligand_split_is_the_default() -> None:
    data = _tagged()
    train, val = split(data, 0.25)
    assert set(train.ligand_id.tolist()).isdisjoint(val.ligand_id.tolist())


def test_random_split_splits_rows() -> None:
    data = _tagged()
    train, val = split(data, 0.2, seed=1, by="random")
    _check_partition(data, train, val)
    assert len(val) == round(0.2 * len(data))
    # rows, not ligands: with many multi-pocket ligands, some ligand lands on both sides
    assert set(train.ligand_id.tolist()) & set(val.ligand_id.tolist())
    again = split(data, 0.2, seed=1, by="random")
    np.testing.assert_array_equal(_rows(again[1]), _rows(val))


@pytest.mark.parametrize(("kwargs", "word"), [({"val_fraction": 0.0}, "val_fraction"),
                                              ({"val_fraction": 1.0}, "val_fraction"),
                                              ({"by": "scaffold"}, "scaffold")])
def test_split_rejects_bad_arguments(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(AblateError, match=word):
        split(_tagged(), **kwargs)


def test_ligand_split_with_one_ligand_leaves_a_side_empty() -> None:
    data = PairedEmbeddings(torch.zeros(4, 2), torch.ones(4, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(AblateError, match="empty"):
        split(data, 0.5, by="ligand")


# --------------------------------------------------------------------------------------
# Pockets with several actives
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_pocket_ids_as_ints_or_strings_are_read(tmp_path: Path, fmt: str) -> None:
    arrays = _arrays()
    names = ["1abc", "2xyz", "1abc", "1abc", "3def", "2xyz"]
    arrays["pocket_id"] = names  # type: ignore[assignment]  # a list of strings, as users save them
    data = load_pairs(write(tmp_path / f"pairs.{fmt}", arrays))
    assert _same_pattern(data.pocket_id.numpy()).tolist() == _same_pattern(np.array(names)).tolist()


def test_without_pocket_id_identical_pocket_rows_share_an_id(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["pocket"][3] = arrays["pocket"][0]
    data = load_pairs(write(tmp_path / "pairs.npz", arrays))
    ids = data.pocket_id.numpy()
    assert ids[0] == ids[3] and len(set(ids.tolist())) == 5


@pytest.mark.parametrize(("bad", "message"), [
    (np.array([0.5, 1, 2, 3, 4, 5]), "'pocket_id' must hold integers or strings"),
    (np.array([1, 2, 3]), "'pocket_id' has 3 rows but 'pocket' has 6"),
    (np.zeros((6, 2)), "'pocket_id' must be 1-D"),
])
def test_bad_pocket_ids_are_one_line_errors(tmp_path: Path, bad: np.ndarray, message: str) -> None:
    arrays = {**_arrays(), "pocket_id": bad}
    with pytest.raises(AblateError, match=message):
        load_pairs(write(tmp_path / "pairs.npz", arrays))


def test_pocket_split_keeps_every_pocket_on_one_side() -> None:
    data = synthetic_pairs(SMALL)
    train, val = split(data, 0.25, seed=3, by="pocket")
    assert not set(train.pocket_id.tolist()) & set(val.pocket_id.tolist())
    assert len(train) + len(val) == len(data)


def test_synthetic_pockets_are_ligand_families_with_several_actives() -> None:
    data = synthetic_pairs(SMALL)
    actives = {}
    for p, lig in zip(data.pocket_id.tolist(), data.ligand_id.tolist(), strict=True):
        actives.setdefault(p, set()).add(lig)
    assert max(len(a) for a in actives.values()) >= 3  # a pocket with several distinct actives
    # a pocket's actives are one family: their embeddings are closer to each other than to other pockets'
    unit = torch.nn.functional.normalize(data.ligand, dim=1)
    cos = (unit @ unit.T).numpy()
    same = _same_pattern(data.pocket_id.numpy()) & ~_same_pattern(data.ligand_id.numpy())
    other = ~_same_pattern(data.pocket_id.numpy())
    assert cos[same].mean() > cos[other].mean() + 0.2


def test_bfloat16_pt_files_are_read_as_float32(tmp_path: Path) -> None:
    arrays = _arrays()
    torch.save({"pocket": torch.from_numpy(arrays["pocket"]).bfloat16(),
                "ligand": torch.from_numpy(arrays["ligand"]).bfloat16()}, tmp_path / "pairs.pt")
    data = load_pairs(tmp_path / "pairs.pt")
    assert data.pocket.dtype == torch.float32
    assert torch.allclose(data.pocket, torch.from_numpy(arrays["pocket"]).bfloat16().float())


def test_finite_float64_values_beyond_float32_are_named_as_such(tmp_path: Path) -> None:
    arrays = _arrays()
    pocket = arrays["pocket"].astype(np.float64)
    pocket[2, 1] = 1e300
    arrays["pocket"] = pocket
    with pytest.raises(AblateError, match=r"1 row\(s\) with values beyond float32's range \(first: 2\)"):
        load_pairs(write(tmp_path / "pairs.npz", arrays))


# --------------------------------------------------------------------------------------
# Three-way splits: train, validation, test
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["ligand", "pocket", "random"])
def test_three_way_splits_partition_the_rows_and_keep_their_unit_in_one_part(by: str) -> None:
    data = _tagged()
    parts = split_rows(data, 0.2, test_fraction=0.25, seed=2, by=by)
    train, val, test = (data.subset(parts[name]) for name in ("train", "val", "test"))
    rows = np.concatenate([_rows(train), _rows(val), _rows(test)])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(data)))
    assert abs(len(val) / len(data) - 0.2) < 0.04 and abs(len(test) / len(data) - 0.25) < 0.04
    if by != "random":
        unit = (lambda p: p.ligand_id) if by == "ligand" else (lambda p: p.pocket_id)
        sets = [set(unit(p).tolist()) for p in (train, val, test)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_adding_a_test_split_keeps_the_validation_pairs() -> None:
    data = _tagged()
    _, val_two = split(data, 0.2, seed=4)
    three = split_rows(data, 0.2, test_fraction=0.2, seed=4)
    np.testing.assert_array_equal(_rows(val_two), _rows(data.subset(three["val"])))
    assert len(three["test"]) > 0


def test_the_default_data_spec_holds_out_a_fifth_for_test() -> None:
    parts = load_split(DataSpec())
    n = len(parts.train) + len(parts.val) + len(parts.test)
    assert abs(len(parts.test) / n - 0.2) < 0.03 and abs(len(parts.val) / n - 0.2) < 0.03
    doc = parts.document()
    assert sorted(doc["train"] + doc["val"] + doc["test"]) == list(range(n))
    assert parts.how == "ligand-disjoint split, 60/20/20 %"


def test_fractions_that_leave_nothing_to_train_on_are_refused() -> None:
    with pytest.raises(ValidationError, match="leave no pairs to train on"):
        DataSpec(val_fraction=0.5, test_fraction=0.5)


def _labelled(n: int = 12) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    arrays = {"pocket": rng.standard_normal((n, 5)).astype(np.float32),
              "ligand": rng.standard_normal((n, 4)).astype(np.float32),
              "ligand_id": np.arange(n, dtype=np.int64)}
    arrays["split"] = ["train"] * 6 + ["val"] * 3 + ["test"] * 3  # type: ignore[assignment]
    return arrays


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_with_its_own_split_keeps_it(tmp_path: Path, fmt: str) -> None:
    arrays = _labelled()
    arrays["split"] = ["val", "train", "test", "train", "train", "val", "test", "train", "val", "test", "train",
                       "train"]
    path = write(tmp_path / f"pairs.{fmt}", arrays)
    parts = load_split(DataSpec(source=str(path)))
    labels = np.array(arrays["split"])
    for name in ("train", "val", "test"):
        assert parts.rows[name] == np.flatnonzero(labels == name).tolist()
    np.testing.assert_array_equal(parts.test.pocket.numpy(), arrays["pocket"][labels == "test"])
    assert parts.how == "the data file's own split"
    assert len(load_pairs(path)) == 12  # the pairs load as before; the split is the split's business


@pytest.mark.parametrize(("labels", "message"), [
    (["train"] * 6 + ["val"] * 3 + ["test", "tset", "test"], r"row 10, 'tset'"),
    (["train"] * 9 + ["test"] * 3, "its 'split' array has no 'val' rows"),
    (["train"] * 9 + ["val"] * 3, "no 'test' rows; label some rows"),
    (["train"] * 6 + ["val"] * 3 + ["test"] * 2, "one label per row"),
])
def test_bad_split_labels_are_one_line_errors(tmp_path: Path, labels: list[str], message: str) -> None:
    arrays = {**_labelled(), "split": np.array(labels)}
    path = write(tmp_path / "pairs.npz", arrays)
    with pytest.raises(AblateError, match=message) as err:
        load_split(DataSpec(source=str(path)))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_null_split_label_in_parquet_is_named(tmp_path: Path) -> None:
    arrays = _labelled()
    arrays["split"] = [*arrays["split"][:4], None, *arrays["split"][5:]]
    path = write(tmp_path / "pairs.parquet", arrays)
    with pytest.raises(AblateError, match="row 4, missing"):
        load_split(DataSpec(source=str(path)))


def test_numeric_split_labels_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.npz", {**_labelled(), "split": np.zeros(12)})
    with pytest.raises(AblateError, match='must hold the strings "train", "val" or "test"'):
        load_split(DataSpec(source=str(path)))


def test_an_external_test_set_is_scored_instead_of_a_test_split(tmp_path: Path) -> None:
    main = write(tmp_path / "main.npz", {k: v for k, v in _labelled(40).items() if k != "split"})
    ext = _labelled(7)
    ext.pop("split")
    other = write(tmp_path / "bench.parquet", ext)
    parts = load_split(DataSpec(source=str(main), test_source=str(other), split="random", val_fraction=0.25))
    assert parts.rows["test"] == list(range(7))
    assert sorted(parts.rows["train"] + parts.rows["val"]) == list(range(40))
    np.testing.assert_array_equal(parts.test.ligand.numpy(), ext["ligand"])
    assert parts.how.endswith(f"test pairs from {other}")  # its ligands are not the training ones


def test_an_external_test_set_must_match_the_widths(tmp_path: Path) -> None:
    main = write(tmp_path / "main.npz", {k: v for k, v in _labelled(40).items() if k != "split"})
    wider = {"pocket": np.zeros((3, 9), np.float32), "ligand": np.ones((3, 4), np.float32)}
    other = write(tmp_path / "bench.npz", wider)
    with pytest.raises(AblateError, match="a test set must match the training data"):
        load_split(DataSpec(source=str(main), test_source=str(other), split="random"))


def test_a_file_split_with_test_rows_and_a_test_source_is_ambiguous(tmp_path: Path) -> None:
    main = write(tmp_path / "main.npz", _labelled())
    other = write(tmp_path / "bench.npz", {k: v for k, v in _labelled().items() if k != "split"})
    with pytest.raises(AblateError, match="drop one of them"):
        load_split(DataSpec(source=str(main), test_source=str(other)))


class _Payload:
    """Pickles into a call of os.system: a .pt file that would run code if loaded unsafely."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return (os.system, ("touch ran-the-payload",))


@pytest.mark.parametrize(("content", "why"), [
    ("numpy", "it holds a numpy._core.multiarray._reconstruct object, which a safe load (weights_only) refuses"),
    ("payload", "which a safe load (weights_only) refuses"),
    ("bytes", "it is not a file that torch.save wrote, or it is damaged"),
])
def test_a_pt_file_that_cannot_load_safely_is_one_line_that_never_suggests_unsafe_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, why: str) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "pairs.pt"
    if content == "numpy":
        torch.save({"pocket": np.zeros((4, 3)), "ligand": np.zeros((4, 2))}, path)
    elif content == "payload":
        torch.save({"pocket": _Payload()}, path)
    else:
        path.write_bytes(bytes(range(256)) * 3)
    with pytest.raises(AblateError) as err:
        load_pairs(path)
    text = str(err.value)
    assert why in text and "torch.save({'pocket': torch.as_tensor(pocket)" in text
    assert "\n" not in text and "\x1b" not in text and "weights_only=False" not in text and "trust" not in text
    assert not (tmp_path / "ran-the-payload").exists()


def test_a_null_row_in_a_parquet_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"pocket": pa.array([[1.0, 2.0], [3.0, 4.0], None, [5.0, 6.0]]),
                             "ligand": pa.array([[1.0], [2.0], [3.0], [4.0]])}), path)
    with pytest.raises(AblateError, match=r"column 'pocket' has 1 empty \(null\) row\(s\) \(first: row 2\)"):
        load_pairs(path)


def test_a_test_file_with_its_own_split_gives_its_test_rows_and_overlap_is_said(tmp_path: Path) -> None:
    main_arrays = {k: v for k, v in _labelled(40).items() if k != "split"}
    main = write(tmp_path / "main.npz", main_arrays)
    bench = _labelled(12)
    bench["ligand"][9] = main_arrays["ligand"][0]  # a test ligand that the training data has too
    other = write(tmp_path / "bench.npz", bench)
    parts = load_split(DataSpec(source=str(main), test_source=str(other), split="random", val_fraction=0.25))
    assert parts.rows["test"] == [9, 10, 11]
    np.testing.assert_array_equal(parts.test.pocket.numpy(), bench["pocket"][9:])
    assert parts.how.endswith("; 1 of 3 test pairs have a ligand that training or validation also has")


def test_the_training_data_as_its_own_test_set_is_refused(tmp_path: Path) -> None:
    main = write(tmp_path / "main.npz", {k: v for k, v in _labelled(40).items() if k != "split"})
    with pytest.raises(AblateError, match="is the training data itself"):
        load_split(DataSpec(source=str(main), test_source=str(main)))


def test_a_missing_test_file_is_named_as_one(tmp_path: Path) -> None:
    main = write(tmp_path / "main.npz", {k: v for k, v in _labelled(40).items() if k != "split"})
    with pytest.raises(AblateError, match=r"nope.npz: no such test data file \(give a .npz, .pt or .parquet file\)$"):
        load_split(DataSpec(source=str(main), test_source=str(tmp_path / "nope.npz")))


def test_split_labels_that_are_not_utf8_are_one_line(tmp_path: Path) -> None:
    arrays = {**_labelled(), "split": np.array([b"train"] * 6 + [b"val"] * 3 + [b"test", b"\xff\xfe", b"test"])}
    path = write(tmp_path / "pairs.npz", arrays)
    with pytest.raises(AblateError, match="first: row 10"):
        load_split(DataSpec(source=str(path)))
