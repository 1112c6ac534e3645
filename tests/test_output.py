"""What commands print: plain lines and full-width Markdown when stdout is not a terminal (a log, a pipe),
and tables that fit an 80-column terminal."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from rich.console import Console
from support import ablate_command

from ablate.report import render
from ablate.report.compare import SearchSummary, TrialRow
from ablate.study.studyfiles import load_study

EXPERIMENTS = list(load_study("baseline-vs-multistage").experiments)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _ablate(workdir, *args: str, terminal: bool = False) -> str:
    """`ablate ARGS` in a fresh process with stdout piped (or, with ``terminal``, as rich would write to
    an 80-column terminal); returns stdout without colour codes."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    env.update({"COLUMNS": "80", "PYTHONUNBUFFERED": "1"})
    if terminal:
        env["TTY_COMPATIBLE"] = "1"
    proc = subprocess.run(ablate_command(*args), cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert terminal or "\x1b[" not in proc.stdout
    return ANSI.sub("", proc.stdout)


def _index(lines: list[str], pattern: str) -> int:
    found = [i for i, line in enumerate(lines) if re.fullmatch(pattern, line)]
    assert len(found) == 1, f"{pattern!r} matches {len(found)} lines"
    return found[0]


@pytest.mark.slow
def test_a_piped_suite_prints_a_line_per_trial_event_then_markdown_tables(workdir):
    out = _ablate(workdir, "run-suite", "baseline-vs-multistage", "--epochs", "4", "--seeds", "0", "--data",
                  "pairs.npz", "--set", "model.hidden=[16]", "--set", "model.dropout=0.0", "--jobs", "1",
                  "--array", "1")
    assert "\r" not in out and "━" not in out  # no live display, no box drawing
    lines = out.splitlines()
    study = re.search(r"^study (\S+) in ", out, re.M)[1]

    ended = []
    for e in EXPERIMENTS:
        start = _index(lines, rf"trial #(\d+) {e} s0: started \(4 epochs, pid \d+\)")
        n = re.match(r"trial #(\d+)", lines[start])[1]
        epochs = [_index(lines, rf"trial #{n} {e} s0: epoch {k}/4 val/top1 \d\.\d{{4}}") for k in (1, 2, 3)]
        end = _index(lines, rf"trial #{n} {e} s0: COMPLETE, last value \d\.\d{{4}}, \d+\.\d s \(\d/5 done\)")
        assert start < epochs[0] < epochs[1] < epochs[2] < end
        ended.append(end)

    # the comparison follows, as Markdown tables at full width (not cut or wrapped to the 80 columns)
    headers = [i for i, line in enumerate(lines) if re.match(r"\| experiment \| n \| `(test|val)/top1` \|", line)]
    assert len(headers) == 3 and headers[0] > max(ended)  # test; validation at the selected and the final epoch
    assert [lines[i - 2] for i in headers] == [
        "#### Test: each run's selected model, scored once",
        "#### Validation at the selected epoch (biased upwards: `val/mrr` chose that epoch on these pairs)",
        "#### Validation at the final epoch"]
    for h in headers:
        assert lines[h + 1].startswith("|---|---:|---:|")
        rows = lines[h + 2: h + 2 + len(EXPERIMENTS)]
        assert [r.split("|")[1].strip() for r in rows] == EXPERIMENTS
        assert all(r.count("|") == lines[h].count("|") for r in rows)
        assert max(len(r) for r in rows) > 80
    against = [i for i, line in enumerate(lines) if line.startswith("| experiment | n | difference [95 % CI] |")]
    # the headline (test, selected model) and its validation metric at the final epoch against the baseline
    assert len(against) == 2 and max(ended) < against[0]
    assert all(lines[i + 1].startswith("|---|") for i in against)
    assert lines[-1].startswith(f"report: reports/{study}/report.md")

    # `studies show` piped: the trials as a Markdown table; in an 80-column terminal: a table that fits
    shown = _ablate(workdir, "studies", "show", study).splitlines()
    top = _index(shown, r"\| # \| state \| configuration \| `test/top1` \| epochs \| note \|")
    assert shown[top + 1].startswith("|---:|")
    assert [r.split("|")[3].strip() for r in shown[top + 2: top + 7]] == [f"{e} s0" for e in EXPERIMENTS]
    shown = _ablate(workdir, "studies", "show", study, terminal=True).splitlines()
    assert max(len(line) for line in shown) <= 80
    assert "…" not in "\n".join(shown)
    assert all(any(f" {e} s0 " in line for line in shown) for e in EXPERIMENTS)
    # `studies list` in 80 columns: the study's name, which the other commands take, is never cut
    listed = _ablate(workdir, "studies", "list", terminal=True)
    table = listed.splitlines()[1:]  # below the title "studies in PATH", a path left whole to copy
    assert max(len(line) for line in table) <= 80 and "…" not in listed
    assert re.search(rf"^{study} +suite +5/5 +0 ", listed, re.M), listed


def test_studies_show_fits_80_columns_without_cutting_anything():
    long_note = "the worker stopped sending heartbeats (it died or lost the database); retried as #1031"
    trials = [
        TrialRow(1029, "COMPLETE", "alpha=0.3185 beta=0.05926 gamma=0.6222", 0.98765, 300, ""),
        TrialRow(1030, "PRUNED", "alpha=0.8364 beta=0.05926 gamma=0.1044", 0.1669, 16,
                 "val/mrr 0.1669 at epoch 15 is below the median of earlier trials at that epoch"),
        TrialRow(1031, "FAIL", "alpha=0.2783 beta=0.6589 gamma=0.06276", None, 2, long_note),
        TrialRow(1032, "COMPLETE", "batch_size=256 lr=0.001414 temperature=0.07 weight_decay=0.0001",
                 0.5, 120, "diverged"),
    ]
    summary = SearchSummary("val/mrr", trials, {"COMPLETE": 2, "PRUNED": 1, "FAIL": 1}, trials[0],
                            {"alpha": 0.61, "beta": 0.3, "gamma": 0.09}, [0.4 + i / 1000 for i in range(60)],
                            waiting=3)
    console = Console(width=80, record=True, markup=False, soft_wrap=True)
    for item in render.summary_lines("weights-5bea88ec", summary):
        console.print(item, soft_wrap=False)  # as `studies show` prints in a terminal
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "…" not in text
    for t in trials[:3]:  # a configuration fits on its row, its value beside it
        assert re.search(rf"^ *{t.number} +{t.state} +{re.escape(t.label)} +{render.fmt(t.value)} +{t.epochs}\b",
                         text, re.M), text
    words = " ".join(text.split())
    for t in trials:
        assert t.label.split()[-1] in words
        if t.note:  # why it stopped, below the table, by trial number
            assert f"#{t.number} {t.state} {' '.join(t.note.split())}" in words
    assert "expected best val/mrr with n trials" in words and "60: 0.4590" in words


def test_studies_show_lists_the_newest_trials_and_says_how_to_see_the_rest():
    trials = [TrialRow(n, "COMPLETE", f"x={n}", n / 100, 1, "") for n in range(80)]
    summary = SearchSummary("val/mrr", trials, {"COMPLETE": 80}, trials[3], {}, [])
    shown = render.summary_markdown("s", summary, limit=50)
    listed = [int(m) for m in re.findall(r"^\| (\d+) \|", shown, re.M)]
    assert listed == list(range(30, 80))
    assert "30 earlier trial(s) not listed: `ablate studies show --all`" in shown
    assert "best (chosen on val/mrr): trial #3 x=3" in shown  # the best is named even when not listed
    every = render.summary_markdown("s", summary)
    assert [int(m) for m in re.findall(r"^\| (\d+) \|", every, re.M)] == list(range(80))
    assert "not listed" not in every
    console = Console(width=80, record=True, markup=False, soft_wrap=True)
    for item in render.summary_lines("s", summary, limit=50):
        console.print(item, soft_wrap=False)
    text = console.export_text()
    assert re.search(r"^ *30 +COMPLETE", text, re.M) and not re.search(r"^ *29 +COMPLETE", text, re.M)
    assert "30 earlier trial(s) not listed" in " ".join(text.split())
