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
            for name in re.findall(r"[a-z_.]+", re.sub(r"\(.*?\)", "", re.split(r"\s{2,}", row)[0]))}


def _name(parts: list[str], layer: dict[str, int]) -> str | None:
    """The map's name for a module given by its dotted path below ablate: the module, else its package."""
    for n in (2, 1):
        if len(parts) >= n and ".".join(parts[:n]) in layer:
            return ".".join(parts[:n])
    return None


def test_every_module_imports_only_modules_below_it_in_the_architecture_map():
    layer = _layers()
    upward = []
    for path in sorted((ROOT / "ablate").rglob("*.py")):
        parts = [p.removesuffix(".py") for p in path.relative_to(ROOT / "ablate").parts]
        if parts in (["__init__"], ["__main__"]) or (parts[-1] == "__init__" and parts[0] not in layer):
            continue  # the package's lazy exports; a subpackage's docstring
        module = _name(parts, layer)
        assert module is not None, f"{'.'.join(parts)} is missing from the module map in docs/architecture.md"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ablate":
                base = node.module.split(".")[1:]
                whole = _name(base, layer)
                names = [whole] if whole else [_name([*base, a.name], layer) for a in node.names]
            elif isinstance(node, ast.Import):
                names = [_name(a.name.split(".")[1:], layer) for a in node.names if a.name.startswith("ablate.")]
            else:
                continue
            upward += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                       if n is not None and n != module and layer[n] < layer[module]]
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
    probe = ("import ablate.study.studyfiles as s; print(ablate.study.studyfiles.__file__); "
             "print(' '.join(sorted(p.stem for p in s.available_studies()))); print(s.find_study('temperature'))")
    out = subprocess.run([str(python), "-c", "import ablate.study.studyfiles; " + probe], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    module, names, found = out.stdout.splitlines()
    assert module.startswith(str(env))
    assert names == "baseline-vs-multistage batch infonce-vs-siglip roadmap stages temperature weights"
    assert found.startswith(str(env)) and found.endswith("temperature.toml")


def test_a_model_pickled_under_a_modules_old_path_still_loads():
    """Models logged to MLflow are pickled by class path: ablate.models.* moved to ablate.training.models."""
    code = ("import pickle; from ablate.training.models import Dropout; "
            "data = pickle.dumps(Dropout(0.25), protocol=0).replace(b'ablate.training.models', b'ablate.models'); "
            "assert b'ablate.training' not in data; m = pickle.loads(data); "
            "print(type(m).__module__, type(m).__name__, m.p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ablate.training.models", "Dropout", "0.25"]


def test_metric_keys_and_mlflow_tags_are_spelled_only_by_the_vocabulary():
    from ablate import vocabulary

    known = {*vocabulary.METRIC_KEYS, *vocabulary.TEST_KEYS,
             *(f"{split}/{name}" for split in ("val", "test") for name in vocabulary.EMBEDDING_DIAGNOSTICS)}
    tags = {str(t) for t in vocabulary.Tag}
    unknown, spelled = [], []
    for path in sorted((ROOT / "ablate").rglob("*.py")):
        text = path.read_text()
        unknown += [f"{path.name}: {k}" for k in re.findall(r"\"((?:train|val|test)/[a-z0-9_.]+)\"", text)
                    if k not in known]
        if path.name != "vocabulary.py":
            spelled += [f"{path.name}: {t}" for t in re.findall(r"\"(ablate\.[a-z_]+)\"", text) if t in tags]
    assert not unknown, unknown
    assert not spelled, spelled


def test_no_module_is_over_450_lines_and_no_function_body_over_60():
    long_modules, long_functions = [], []
    for path in sorted((ROOT / "ablate").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 450:
            long_modules.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body  # a command's signature is its help
                if body and body[-1].end_lineno - body[0].lineno + 1 > 60:  # type: ignore[operator]
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
