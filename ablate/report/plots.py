"""Figures of a suite and of a search, drawn from plain data into PNG files.

``suite_curves`` draws per-epoch curves over seeds (mean and 95 % Student-t band, stage switches marked);
``search_plots`` draws the objective against each searched parameter and the expected best value against the
trial budget (Dodge et al. 2019). matplotlib is imported inside the functions (its object API on an Agg canvas,
never pyplot's global state), so importing this module stays cheap and drawing is safe from any thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ablate.report import stats
from ablate.vocabulary import Outcome

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ablate.report.compare import TrialRow

ZOOM_FRACTION = 0.1  # the zoom panel shows the first 10 % of the epochs ...
ZOOM_MIN_EPOCHS = 10  # ... and at least this many; it is drawn only when the run is over twice as long
DPI = 120


# --------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Band:
    """Per 0-based epoch: the mean over the seeds that reached it, and its 95 % interval (NaN where n < 2)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @property
    def epochs(self) -> np.ndarray:
        return np.arange(len(self.mean))


def _band(runs: Sequence[Sequence[float]]) -> _Band:
    length = max((len(r) for r in runs), default=0)
    rows = [stats.summarize([r[i] for r in runs if len(r) > i]) for i in range(length)]
    return _Band(np.array([s.mean for s in rows], dtype=float), np.array([s.ci_low for s in rows], dtype=float),
                 np.array([s.ci_high for s in rows], dtype=float))


def _zoom_end(n_epochs: int) -> int | None:
    """The last epoch (0-based, inclusive) of the zoom panel, or None when the whole run is short enough."""
    width = max(ZOOM_MIN_EPOCHS, math.ceil(ZOOM_FRACTION * n_epochs))
    return width - 1 if n_epochs > 2 * width else None


HEIGHT = 4.5
MARGINS = {"left": 0.8, "right": 0.2, "bottom": 0.55, "top": 0.75, "between": 0.85}
"""Figure margins in inches: room for tick labels and axis labels, the title and the panel titles. Fixed
margins rather than matplotlib's constrained layout, which re-solves the layout on every draw and took a
third of the time of a suite's plots."""


def _new_figure(panels: int, width: float) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    total = width * panels
    fig = Figure(figsize=(total, HEIGHT), dpi=DPI)
    FigureCanvasAgg(fig)
    m = MARGINS
    panel = (total - m["left"] - m["right"] - m["between"] * (panels - 1)) / panels
    fig.subplots_adjust(left=m["left"] / total, right=1 - m["right"] / total, bottom=m["bottom"] / HEIGHT,
                        top=1 - m["top"] / HEIGHT, wspace=m["between"] / panel)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def suite_curves(series: dict[str, dict[str, list[list[float]]]], keys: Sequence[str], out_dir: Path, title: str,
                 stages: dict[str, list[int]] | None = None) -> list[Path]:
    """Per-epoch curves per metric key (mean over seeds, 95 % CI), one PNG per key with data; returns the files.

    ``series[experiment][key]`` holds one per-epoch list per seed; an epoch's mean and Student-t band
    (``stats.summarize``) use the seeds that reached it and their finite values, so a seed that stopped early or
    a NaN leaves that epoch's statistics, a single seed draws no band, and a key with no finite value in any
    experiment is skipped; ``title`` (e.g. the study's name) starts each figure's title. Experiments keep their
    order and colour (``C0``, ``C1``, ... by position in ``series``) in every figure. The x axis is the 0-based
    epoch (MLflow's step); ``stages[experiment]`` lists the epochs where that experiment enters its next stage,
    drawn as dashed lines in its colour and labelled "stage 2", "stage 3", ... (a switch after the experiment's
    last epoch is not drawn). Early epochs are made readable by a second panel: next to the whole run, a zoom on
    its first 10 % of epochs (at least 10) with the y axis fitted to the data there; runs of 20 epochs or fewer
    get the single panel. Files are named after the key, '/' -> '_'.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = stages or {}
    colours = {exp: f"C{i % 10}" for i, exp in enumerate(series)}
    written = []
    for key in keys:
        bands = {exp: _band(by_key[key]) for exp, by_key in series.items() if by_key.get(key)}
        if not any(np.isfinite(b.mean).any() for b in bands.values()):
            continue
        n_epochs = max(len(b.mean) for b in bands.values())
        zoom = _zoom_end(n_epochs)
        fig, axes = _new_figure(1 if zoom is None else 2, 6.5)
        for exp, band in bands.items():
            runs = series[exp][key]
            label = f"{exp} (n={len(runs)} seed{'s' if len(runs) != 1 else ''})"
            if not np.isfinite(band.mean).any():
                label += ", no finite value"
            for i, ax in enumerate(axes):
                _draw_band(ax, exp, band, colours[exp], label if i == 0 else None)
                _draw_stages(ax, exp, [s for s in stages.get(exp, []) if 0 <= s < len(band.mean)], colours[exp],
                             label=i == 0)
        axes[0].set_xlim(0, max(n_epochs - 1, 1))
        axes[0].set_title("all epochs", fontsize=9)
        if zoom is not None:
            axes[1].set_xlim(0, zoom)
            axes[1].set_ylim(*_fit(bands.values(), zoom))
            axes[1].set_title(f"first {zoom + 1} epochs", fontsize=9)
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[0].legend(loc="best", fontsize=8)
        fig.suptitle(f"{title}: {key} per epoch (mean over seeds, 95 % CI)")
        path = out_dir / f"{_file_name(key.replace('/', '_'))}.png"
        fig.savefig(path)
        written.append(path)
    return written


def _draw_band(ax: Axes, exp: str, band: _Band, colour: str, label: str | None) -> None:
    ax.plot(band.epochs, band.mean, color=colour, linewidth=1.4, label=label, gid=f"mean:{exp}")
    if np.isfinite(band.low).any():
        ax.fill_between(band.epochs, band.low, band.high, color=colour, alpha=0.2, linewidth=0, gid=f"band:{exp}")


def _draw_stages(ax: Axes, exp: str, switches: Sequence[int], colour: str, label: bool) -> None:
    for k, epoch in enumerate(switches):
        ax.axvline(epoch, color=colour, linestyle="--", linewidth=1.0, gid=f"stage:{exp}",
                   label=f"{exp}: stage switch" if label and k == 0 else None)
        ax.text(epoch, 0.98, f" stage {k + 2}", color=colour, fontsize=7, rotation=90, va="top", ha="left",
                transform=ax.get_xaxis_transform(), clip_on=True, gid=f"stage:{exp}")


def _fit(bands: Iterable[_Band], last_epoch: int) -> tuple[float, float]:
    """y limits that enclose the means and bands of epochs 0..last_epoch, with a 5 % margin."""
    values = np.concatenate([np.concatenate([b.mean[: last_epoch + 1], b.low[: last_epoch + 1],
                                             b.high[: last_epoch + 1]]) for b in bands])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 0.05)
    return lo - pad, hi + pad


# --------------------------------------------------------------------------------------
# Searches
# --------------------------------------------------------------------------------------


def _v(t: TrialRow) -> float:
    """A drawn trial's value (finite: ``_drawn`` keeps only those)."""
    return float(t.value) if t.value is not None else math.nan


def _drawn(trials: Sequence[TrialRow]) -> list[TrialRow]:
    """The trials that are drawn: COMPLETE or PRUNED, with a finite value."""
    return [t for t in trials if t.state in (Outcome.COMPLETE, Outcome.PRUNED) and _is_number(t.value)]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def search_plots(trials: Sequence[TrialRow], params: dict[str, bool], objective: str, maximize: bool,
                 expected_max: Sequence[float], out_dir: Path, title: str) -> list[Path]:
    """The objective against each searched parameter, and the expected best against the budget; returns the files.

    One PNG per parameter that some drawn trial has (``param_<name>.png``): COMPLETE trials as filled dots,
    PRUNED trials as hollow dots at the last value they reported, FAIL and value-less trials left out, the best
    COMPLETE trial as a star; ``params[name]`` True puts the parameter on a log axis, and a parameter with any
    non-numeric value (str, bool, None) is drawn as categories. Then ``expected_max.png``:
    ``expected_max[n-1]``, the expected best of n trials (Dodge et al. 2019), against n, with the observed
    running best over the COMPLETE and PRUNED trials that have a value, in the given order (the trials that
    ``stats.expected_max`` is computed from in the search summary).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = _drawn(trials)
    complete = [t for t in drawn if t.state == Outcome.COMPLETE]
    best = (max if maximize else min)(complete, key=_v) if complete else None
    written = []
    for name, log in params.items():
        have = [t for t in drawn if name in t.params]
        if not have:
            continue
        fig, (ax,) = _new_figure(1, 7.0)
        _param_panel(ax, name, log, have, best)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.suptitle(f"{title}: {objective} against {name} ({'higher' if maximize else 'lower'} is better)")
        path = out_dir / f"param_{_file_name(name)}.png"
        fig.savefig(path)
        written.append(path)
    running = (np.maximum if maximize else np.minimum).accumulate(np.array([_v(t) for t in drawn], dtype=float))
    if len(expected_max) or len(running):
        fig, (ax,) = _new_figure(1, 7.0)
        ax.plot(np.arange(1, len(expected_max) + 1), np.asarray(expected_max, dtype=float), marker=".", color="C0",
                gid="expected_max", label="expected best of n trials (Dodge et al. 2019)")
        ax.step(np.arange(1, len(running) + 1), running, where="post", color="C1", gid="running_best",
                label="observed best after n trials")
        ax.set_xlabel("trial budget n")
        ax.set_ylabel(f"best {objective}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.suptitle(f"{title}: expected best {objective} against the number of trials")
        path = out_dir / "expected_max.png"
        fig.savefig(path)
        written.append(path)
    return written


def _param_panel(ax: Axes, name: str, log: bool, trials: Sequence[TrialRow], best: TrialRow | None) -> None:
    values = [t.params[name] for t in trials]
    categorical = not all(_is_number(v) for v in values)
    if categorical:
        labels = sorted({str(v): v for v in values}.items(),
                        key=lambda kv: (0, float(kv[1]), "") if _is_number(kv[1]) else (1, 0.0, kv[0]))
        position = {label: float(i) for i, (label, _) in enumerate(labels)}
        ax.set_xticks(list(position.values()), list(position))
        ax.set_xlim(-0.5, len(position) - 0.5)

        def x_of(v: Any) -> float:
            return position[str(v)]
    else:
        def x_of(v: Any) -> float:
            return float(v)

    complete = [t for t in trials if t.state == Outcome.COMPLETE]
    pruned = [t for t in trials if t.state == Outcome.PRUNED]
    if complete:
        ax.scatter([x_of(t.params[name]) for t in complete], [_v(t) for t in complete], s=28, alpha=0.8,
                   color="C0", gid="complete", label=f"complete ({len(complete)})")
    if pruned:
        ax.scatter([x_of(t.params[name]) for t in pruned], [_v(t) for t in pruned], s=28, alpha=0.8,
                   facecolors="none", edgecolors="C3", gid="pruned",
                   label=f"pruned ({len(pruned)}), value when stopped")
    if best is not None and name in best.params:
        ax.scatter([x_of(best.params[name])], [_v(best)], marker="*", s=220, color="gold", edgecolors="black",
                   zorder=3, gid="best", label=f"best ({best.value:.4g})")
    if log and not categorical and all(float(v) > 0 for v in values):
        ax.set_xscale("log")
    ax.set_xlabel(f"{name}{' (log scale)' if ax.get_xscale() == 'log' else ''}")
