"""The code base stays ruff- and mypy-clean and layered as docs/architecture.md says."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_is_clean():
    proc = _run("ruff", "check", "ablate", "tests", "benchmarks")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.background([sys.executable, "-m", "mypy", "ablate"])
def test_mypy_is_clean(background_result):
    assert background_result.returncode == 0, background_result.stdout + background_result.stderr


def _layers() -> dict[str, int]:
    """Each module's row in the module map of docs/architecture.md (modules on one row share it)."""
    block = (ROOT / "docs" / "architecture.md").read_text().split("```\n")[1]
    rows = [line for line in block.splitlines() if line and not line.startswith(" ")]
    return {name: i for i, row in enumerate(rows)
            for name in re.findall(r"[a-z_]+", re.sub(r"\(.*?\)", "", re.split(r"\s{2,}", row)[0]))}


def test_every_module_imports_only_modules_below_it_in_the_architecture_map():
    layer = _layers()
    upward = []
    for path in sorted((ROOT / "ablate").rglob("*.py")):
        module = path.relative_to(ROOT / "ablate").parts[0].removesuffix(".py")
        if module in ("__init__", "__main__"):
            continue
        assert module in layer, f"{module} is missing from the module map in docs/architecture.md"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ablate":
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("ablate.")]
            else:
                continue
            upward += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                       if n in layer and n != module and layer[n] < layer[module]]
    assert not upward, upward


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^pip install .*$", readme, re.M)
    assert len(commands) >= 2, "the quick start has an install-and-run command and a test command"
    assert "ablate run-suite baseline-vs-multistage" in commands[0]
    assert commands[1].endswith("&& pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m 1 -E '^pip install .*&& pytest' README.md" in ci


def test_a_wheel_install_finds_the_built_in_studies_outside_a_checkout(tmp_path):
    wheels, env = tmp_path / "wheels", tmp_path / "env"
    proc = _run("pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    proc = _run("pip", "--python", str(python), "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The wheel's ablate, with this environment's dependencies, run where there is no studies/ folder.
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    probe = ("import ablate.studyfiles as s; print(ablate.studyfiles.__file__); "
             "print(' '.join(sorted(p.stem for p in s.available_studies()))); print(s.find_study('temperature'))")
    out = subprocess.run([str(python), "-c", "import ablate.studyfiles; " + probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    module, names, found = out.stdout.splitlines()
    assert module.startswith(str(env))
    assert names == "baseline-vs-multistage batch infonce-vs-siglip temperature weights"
    assert found.startswith(str(env)) and found.endswith("temperature.toml")
