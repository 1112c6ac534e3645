"""The figures of a suite and of a search: the files written, and the data drawn checked against numpy and scipy."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import Collection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats as sps

from ablate.report.compare import TrialRow
from ablate.report.plots import search_plots, suite_curves

NAN = float("nan")


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """Every figure the plot functions save, by file name, kept to inspect what was drawn."""
    figures: dict[str, Figure] = {}
    original = Figure.savefig

    def savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        figures[Path(fname).name] = self
        original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk, read by hand."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def lines(ax: Axes, gid: str) -> list[Line2D]:
    return [ln for ln in ax.get_lines() if ln.get_gid() == gid]


def collections(ax: Axes, gid: str) -> list[Collection]:
    return [c for c in ax.collections if c.get_gid() == gid]


def band_edges(band: Collection, epoch: int) -> tuple[float, float] | None:
    """The lowest and highest y of the band's polygons at one epoch (None where the band leaves it out)."""
    verts = np.concatenate([p.vertices for p in band.get_paths()])
    ys = verts[np.isclose(verts[:, 0], epoch), 1]
    return (float(ys.min()), float(ys.max())) if ys.size else None


def expected(runs: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch: nanmean over the seeds that reached it, the seeds counted, and scipy's 95 % t interval."""
    length = max(len(r) for r in runs)
    m = np.full((len(runs), length), np.nan)
    for i, r in enumerate(runs):
        m[i, : len(r)] = r
    n = np.isfinite(m).sum(axis=0)
    with warnings.catch_warnings():  # an epoch with no finite value (or one) warns
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(m, axis=0)
        sd = np.nanstd(m, axis=0, ddof=1)
    low, high = np.full(length, np.nan), np.full(length, np.nan)
    for e in range(length):
        if n[e] >= 2:
            low[e], high[e] = sps.t.interval(0.95, n[e] - 1, loc=mean[e], scale=sd[e] / math.sqrt(n[e]))
    return mean, n, low, high


RUNS = {  # three seeds of different lengths, NaN at epochs 1 and 3
    "baseline": [[0.1, 0.2, 0.30, 0.35, 0.36], [0.12, NAN, 0.28, 0.33], [0.08, 0.25, 0.31]],
    "multistage": [[0.2, 0.3, 0.4, NAN, 0.5], [0.22, 0.33, 0.41, 0.47, 0.52]],
    "single": [[0.05, 0.15, 0.2]],
}


def test_one_png_per_key_with_data_named_after_the_key(tmp_path: Path) -> None:
    series = {exp: {"val/top1": runs} for exp, runs in RUNS.items()}
    series["baseline"]["val/cosine"] = [[0.5, 0.6], [0.55, 0.65]]
    series["single"]["val/mrr"] = [[NAN, NAN]]  # a key with no finite value draws nothing
    files = suite_curves(series, ["val/top1", "val/cosine", "val/mrr", "val/top5"], tmp_path / "out", "suite")
    assert files == [tmp_path / "out" / "val_top1.png", tmp_path / "out" / "val_cosine.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["val_cosine.png", "val_top1.png"]
    for f in files:
        width, height = png_size(f)
        assert 600 <= width <= 3000 and 300 <= height <= 1500
        assert f.stat().st_size > 5000


def test_mean_line_is_the_nanmean_and_the_band_the_student_t_interval(tmp_path: Path,
                                                                       saved: dict[str, Figure]) -> None:
    suite_curves({exp: {"val/top1": runs} for exp, runs in RUNS.items()}, ["val/top1"], tmp_path, "suite")
    (ax,) = saved["val_top1.png"].axes  # 5 epochs: no zoom panel
    for exp, runs in RUNS.items():
        mean, n, low, high = expected(runs)
        (line,) = lines(ax, f"mean:{exp}")
        np.testing.assert_array_equal(line.get_xdata(), np.arange(len(mean)))
        np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), mean, rtol=1e-12)
        assert line.get_label() == f"{exp} (n={len(runs)} seed{'s' if len(runs) > 1 else ''})"
        bands = collections(ax, f"band:{exp}")
        if exp == "single":
            assert bands == []  # one seed: no interval
            continue
        (band,) = bands
        for e in range(len(mean)):
            edges = band_edges(band, e)
            if n[e] < 2:
                assert edges is None, f"{exp} epoch {e} has {n[e]} seed(s) and no band"
            else:
                assert edges == pytest.approx((low[e], high[e]), rel=1e-9)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "baseline (n=3 seeds)", "multistage (n=2 seeds)", "single (n=1 seed)"]


def test_stage_switches_are_dashed_lines_at_their_epochs_in_the_experiments_colour(
        tmp_path: Path, saved: dict[str, Figure]) -> None:
    rng = np.random.default_rng(0)
    series = {"baseline": {"val/top1": rng.random((3, 200)).tolist()},
              "multistage": {"val/top1": rng.random((3, 120)).tolist()}}
    suite_curves(series, ["val/top1"], tmp_path, "suite", stages={"multistage": [50, 100, 150]})
    for ax in saved["val_top1.png"].axes:
        (mean,) = lines(ax, "mean:multistage")
        stage_lines = lines(ax, "stage:multistage")
        # the switch at 150 comes after the runs' last epoch (119): not drawn
        assert [ln.get_xdata()[0] for ln in stage_lines] == [50, 100]
        for ln in stage_lines:
            assert list(ln.get_xdata()) == [ln.get_xdata()[0]] * 2  # vertical
            assert ln.get_linestyle() == "--" and ln.get_color() == mean.get_color()
        labels = {(t.get_position()[0], t.get_text().strip()) for t in ax.texts if t.get_gid() == "stage:multistage"}
        assert labels == {(50, "stage 2"), (100, "stage 3")}
        assert lines(ax, "stage:baseline") == []
    full = saved["val_top1.png"].axes[0]
    assert "multistage: stage switch" in [t.get_text() for t in full.get_legend().get_texts()]
    assert lines(full, "mean:baseline")[0].get_color() != lines(full, "mean:multistage")[0].get_color()


def test_a_zoom_panel_shows_the_first_tenth_of_the_epochs_fitted_in_y(tmp_path: Path,
                                                                       saved: dict[str, Figure]) -> None:
    epochs = np.arange(300)
    rise = [list(0.5 * (1 - np.exp(-epochs / 4)) + 0.01 * k) for k in range(3)]  # peaks in the first ~20 epochs
    later = [list(0.2 + 0.3 * epochs / 300 + 0.01 * k) for k in range(3)]
    suite_curves({"a": {"val/top1": rise}, "b": {"val/top1": later}}, ["val/top1"], tmp_path, "suite")
    full, zoom = saved["val_top1.png"].axes
    assert full.get_xlim() == (0, 299)
    assert zoom.get_xlim() == (0, 29)  # ceil(10 % of 300) epochs: 0..29
    for exp in ("a", "b"):  # the zoom draws the same lines as the full panel
        (near,), (whole,) = lines(zoom, f"mean:{exp}"), lines(full, f"mean:{exp}")
        np.testing.assert_array_equal(near.get_ydata(), whole.get_ydata())
    window = []
    for runs in (rise, later):
        _, _, low, high = expected([r[:30] for r in runs])
        window += [*low, *high]
    lo, hi = zoom.get_ylim()
    assert lo <= min(window) and hi >= max(window)
    assert hi - lo <= 1.2 * (max(window) - min(window))  # fitted to the window, not to all 300 epochs


def test_a_short_run_gets_one_panel(tmp_path: Path, saved: dict[str, Figure]) -> None:
    suite_curves({"a": {"val/top1": [[0.1 * i for i in range(20)]] * 2}}, ["val/top1"], tmp_path, "suite")
    (ax,) = saved["val_top1.png"].axes
    assert ax.get_xlim() == (0, 19)


def _trials() -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    out: list[dict[str, Any]] = []
    for i in range(30):
        state = ("COMPLETE", "PRUNED", "FAIL", "COMPLETE", "RUNNING")[i % 5]
        lr = float(10 ** rng.uniform(-5, -2))
        value = None if state in ("FAIL", "RUNNING") else float(rng.uniform(0, 1))
        out.append({"state": state, "value": value,
                    "params": {"lr": lr, "optimizer": ("adamw", "sgd", "lion")[i % 3], "batch": (64, 128)[i % 2]}})
    out.append({"state": "COMPLETE", "value": NAN, "params": {"lr": 1e-3, "optimizer": "sgd", "batch": 64}})
    return out


def _rows(trials: list[dict]) -> list[TrialRow]:
    """The trials as ``studies show`` lists them (what the plots draw)."""
    return [TrialRow(i, t["state"], f"#{i}", t["value"], 1, "", t["params"]) for i, t in enumerate(trials)]


@pytest.mark.parametrize("maximize", [True, False])
def test_search_plots_separate_complete_from_pruned_and_mark_the_best(tmp_path: Path, saved: dict[str, Figure],
                                                                      maximize: bool) -> None:
    trials = _trials()
    files = search_plots(_rows(trials), {"lr": True, "optimizer": False, "batch": False, "absent": False},
                         "val/top1", maximize, [0.1, 0.2, 0.25], tmp_path, "search")
    assert [f.name for f in files] == ["param_lr.png", "param_optimizer.png", "param_batch.png", "expected_max.png"]
    for f in files:
        width, height = png_size(f)
        assert 600 <= width <= 3000 and 300 <= height <= 1500
    ok = [t for t in trials if t["value"] is not None and math.isfinite(t["value"])]
    complete = [t for t in ok if t["state"] == "COMPLETE"]
    pruned = [t for t in ok if t["state"] == "PRUNED"]
    best = (max if maximize else min)(complete, key=lambda t: t["value"])

    (ax,) = saved["param_lr.png"].axes
    assert ax.get_xscale() == "log"
    for gid, group in (("complete", complete), ("pruned", pruned)):
        (points,) = collections(ax, gid)
        np.testing.assert_allclose(points.get_offsets(), [[t["params"]["lr"], t["value"]] for t in group])
    (done,) = collections(ax, "complete")
    (stopped,) = collections(ax, "pruned")
    assert done.get_facecolors()[0][3] > 0 and stopped.get_facecolors().size == 0  # filled vs hollow
    (star,) = collections(ax, "best")
    np.testing.assert_allclose(star.get_offsets(), [[best["params"]["lr"], best["value"]]])

    (ax,) = saved["param_optimizer.png"].axes
    assert ax.get_xscale() == "linear"
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["adamw", "lion", "sgd"]
    (points,) = collections(ax, "complete")
    assert [ticks[int(x)] for x, _ in points.get_offsets()] == [t["params"]["optimizer"] for t in complete]
    (points,) = collections(ax, "pruned")
    assert len(points.get_offsets()) == len(pruned)

    (ax,) = saved["expected_max.png"].axes
    (curve,) = lines(ax, "expected_max")
    np.testing.assert_array_equal(curve.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(curve.get_ydata(), [0.1, 0.2, 0.25])
    (running,) = lines(ax, "running_best")
    values = np.array([t["value"] for t in ok])
    np.testing.assert_allclose(running.get_ydata(), (np.maximum if maximize else np.minimum).accumulate(values))
    np.testing.assert_array_equal(running.get_xdata(), np.arange(1, len(ok) + 1))


def test_a_search_without_finished_trials_draws_nothing(tmp_path: Path) -> None:
    trials = [{"state": "FAIL", "value": None, "params": {"lr": 1e-3}}]
    assert search_plots(_rows(trials), {"lr": True}, "val/top1", True, [], tmp_path, "search") == []
    assert list(tmp_path.iterdir()) == []


def test_importing_plots_leaves_matplotlib_unloaded() -> None:
    code = "import sys, ablate.report.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
