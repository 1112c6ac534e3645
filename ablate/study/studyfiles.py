"""Study files: finding them, reading their TOML, applying ``--set`` and ``--epochs``, and naming a study.

A study is given by path or by name (``studies/NAME.toml`` in the working directory, in a source
checkout, or where a wheel installed them). ``load_study`` returns the validated design; its Optuna
name is the spec's name plus a hash of what decides its trials, so a changed run setting starts a
new study and more seeds or a larger budget extend the same one.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import sysconfig
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ablate import losses
from ablate.errors import AblateError
from ablate.specs import RUN_FIELDS, RunSpec, set_path
from ablate.study.designs import SearchSpec, StudySpec, SuiteSpec, from_document
from ablate.study.interface import NAME_RULE, valid_study_name

STUDY_DIRS = (
    Path("studies"),  # the working directory's own
    Path(__file__).resolve().parents[2] / "studies",  # a source checkout (editable install)
    Path(sysconfig.get_path("data")) / "share" / "ablate" / "studies",  # installed from a wheel
)


def available_studies() -> list[Path]:
    """The study files found in ./studies, in a source checkout and where a wheel installed them."""
    seen: dict[str, Path] = {}
    for d in STUDY_DIRS:
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                seen.setdefault(p.stem, p)
    return list(seen.values())


def find_study(name: str) -> Path:
    """The file of a study given by path or by name (studies/NAME.toml)."""
    p = Path(name)
    if p.suffix == ".toml" or os.sep in name:
        if not p.is_file():
            raise AblateError(f"{name}: no such study file")
        return p
    for d in STUDY_DIRS:
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    names = [f.stem for f in available_studies()]
    hint = difflib.get_close_matches(name, names, n=1)
    raise AblateError(
        f"no study named {name!r}"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" Available: {', '.join(names) or 'none'} (or give a path to a .toml file)"
    )


def parse_value(text: str) -> Any:
    """A CLI value as TOML (numbers, booleans, lists, quoted strings), else the plain string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise AblateError(f"--set value {text[:40]!r}...: nested more than {MAX_NESTING} levels deep; "
                          "give a flat value or a short list") from None
    check_nesting(value, "--set value")
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['a.b=1', 'loss=infonce'] -> {'a.b': 1, 'loss': 'infonce'}; a malformed item is an error."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AblateError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=5e-4")
        out[key.strip()] = parse_value(value.strip())
    return out


def apply_overrides(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a study document with --set overrides applied.

    A key that names a run field (``lr``, ``model.hidden``) applies to every run of the study:
    it is set in [base] and removed from the experiments that set it themselves. Any other key
    is a dotted path into the document (``experiments.infonce.temperature``, ``n_trials``).
    """
    doc = copy.deepcopy(doc)
    for key, value in overrides.items():
        head = key.split(".")[0]
        top_level = set(SuiteSpec.model_fields) | set(SearchSpec.model_fields)
        if (head in RUN_FIELDS or head in _loss_settings(doc)) and head not in top_level:
            set_path(_table(doc, "base", f"--set {key}"), key, value)
            for exp in _table(doc, "experiments", f"--set {key}", create=False).values():
                if isinstance(exp, dict):
                    _drop_path(exp, key)
            params = doc.get("params")
            if isinstance(params, dict):
                params.pop(key, None)
        else:
            parts = key.split(".")
            experiments = doc.get("experiments")
            if head == "experiments" and len(parts) > 1 and isinstance(experiments, dict) \
                    and parts[1] not in experiments:
                hint = difflib.get_close_matches(parts[1], list(experiments), n=1)
                raise AblateError(
                    f"--set {key}: no experiment {parts[1]!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" (the study has: {', '.join(experiments)})"
                )
            set_path(doc, key, value)
    return doc


def _table(doc: dict[str, Any], key: str, what: str, create: bool = True) -> dict[str, Any]:
    """``doc[key]`` (created empty when missing, or only returned so); an AblateError when it is a value."""
    node = doc.setdefault(key, {}) if create else doc.get(key, {})
    if not isinstance(node, dict):
        raise AblateError(f"{what}: {key} is a value ({key} = {node!r}), not a table; "
                          f"write it as a [{key}] table")
    return node


def _drop_path(doc: dict[str, Any], dotted: str) -> None:
    parts = dotted.split(".")
    node: Any = doc
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def scale_epochs(doc: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A copy of a study document where every run trains `epochs` epochs.

    A loss's settings counted in epochs keep their proportions (the multi-stage boundaries: 50/100 of 300
    epochs become 10/20 of 60).
    """
    doc = copy.deepcopy(doc)
    base = _table(doc, "base", "--epochs")
    runs = [base] + [e for e in _table(doc, "experiments", "--epochs", create=False).values() if isinstance(e, dict)]
    base_epochs = base.get("epochs", RunSpec.model_fields["epochs"].default)
    for run in runs:
        old = run.get("epochs", base_epochs)
        merged = {**base, **run}
        loss = merged.get("loss", RunSpec.model_fields["loss"].default)
        definition = _definition(loss)
        if definition is not None and definition.epoch_fields and _is_number(old) and old > 0:
            for key in definition.epoch_fields:
                field = RunSpec.model_fields.get(key)
                value = merged.get(key, field.default if field is not None else definition.defaults[key])
                if _is_number(value) and value:  # a stage of 0 epochs stays 0; a wrong type is validated later
                    run[key] = max(1, round(value * epochs / old))
        run.pop("epochs", None)
    base["epochs"] = epochs
    return doc


def _definition(loss: Any) -> losses.LossDefinition | None:
    """A loss's definition, or None for a name that is not one (validated, and explained, later)."""
    try:
        return losses.resolve(loss) if isinstance(loss, str) else None
    except AblateError:
        return None


def _loss_settings(doc: dict[str, Any]) -> set[str]:
    """The settings of the losses a study document names that are not run spec fields (a user's loss's own)."""
    named = [t.get("loss") for t in [doc.get("base"), *(_values(doc.get("experiments")))] if isinstance(t, dict)]
    params = doc.get("params")
    if isinstance(params, dict) and isinstance(params.get("loss"), dict):
        named += list(params["loss"].get("choices") or [])
    found = {f for d in map(_definition, named) if d is not None for f in d.fields}
    return found - RUN_FIELDS


def _values(table: Any) -> list[Any]:
    return list(table.values()) if isinstance(table, dict) else []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_STUDY_FILE_BYTES = 1024 * 1024
"""A study file is a few kilobytes; a larger one is refused (its spec is copied into every store)."""

MAX_NESTING = 32
"""Tables and lists nest at most this deep in a study file or a --set value (a study needs about 5)."""

TABLES = ("base", "experiments", "params", "claims", "sampler", "pruner", "stability", "lr_scaling")
"""Top-level keys that must be tables when a study file gives them."""


def read_document(path: Path) -> dict[str, Any]:
    """A study file's TOML document; a file too large, not UTF-8, not TOML or nested too deep is an error."""
    try:
        size = path.stat().st_size
        if size > MAX_STUDY_FILE_BYTES:
            raise AblateError(
                f"{path}: the study file has {size:,} bytes, more than the limit of {MAX_STUDY_FILE_BYTES:,} "
                "(1 MiB); a study file holds settings only: keep data in a data file (data.source)")
        raw = path.read_bytes()
    except OSError as e:
        raise AblateError(f"{path}: cannot read the study file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise AblateError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                          "save the study file as UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AblateError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise AblateError(f"{path}: tables or lists nested more than {MAX_NESTING} levels deep; "
                          "a study file needs only a few levels ([experiments.NAME.model])") from None
    check_nesting(doc, str(path))
    for key in TABLES:
        if key in doc and not isinstance(doc[key], dict):
            raise AblateError(f"{path}: {key} must be a table ([{key}]), got {key} = {doc[key]!r}")
    experiments = doc.get("experiments", {})
    for exp, table in experiments.items():
        if not isinstance(table, dict):
            raise AblateError(f"{path}: experiments.{exp} must be a table ([experiments.{exp}]), "
                              f"got {table!r}")
    return doc


def check_nesting(value: Any, where: str) -> None:
    """An AblateError when tables or lists in ``value`` nest deeper than MAX_NESTING (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise AblateError(f"{where}: tables or lists nested more than {MAX_NESTING} levels deep; "
                              "a study needs only a few levels ([experiments.NAME.model])")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def load_study(
    name: str, overrides: dict[str, Any] | None = None, *, epochs: int | None = None,
    experiments: Sequence[str] | None = None,
) -> StudySpec:
    """Read studies/NAME.toml (or a path), apply overrides, and validate it; ``experiments`` keeps only those of a
    suite (and the claims on them; its baseline must be among them)."""
    path = find_study(name)
    doc = read_document(path)
    if experiments is not None:
        doc = _keep_experiments(doc, experiments, path)
    if epochs is not None:
        doc = scale_epochs(doc, epochs)
    doc = apply_overrides(doc, overrides or {})
    check_nesting(doc, str(path))
    if "name" not in doc:
        if not valid_study_name(path.stem):
            raise AblateError(f"{path}: the file name {path.stem!r} is not a valid study name ({NAME_RULE}); "
                              "rename the file or set name = \"...\" in it")
        doc["name"] = path.stem
    return from_document(doc, source=str(path))


def _keep_experiments(doc: dict[str, Any], keep: Sequence[str], path: Path) -> dict[str, Any]:
    """A suite document with only the ``keep`` experiments (and the claims on them)."""
    table = doc.get("experiments")
    if not isinstance(table, dict):
        raise AblateError(f"{path}: not a suite: it has no [experiments.NAME] tables to choose from")
    unknown = [e for e in keep if e not in table]
    if unknown:
        raise AblateError(f"{path}: no experiment {unknown[0]!r} (the suite has: {', '.join(table)})")
    doc = {**doc, "experiments": {e: t for e, t in table.items() if e in keep}}
    if isinstance(doc.get("claims"), dict):
        doc["claims"] = {e: c for e, c in doc["claims"].items() if e in keep}
    return doc


def safe_folder(base: Path, name: str) -> Path:
    """``base / name``, or an AblateError unless it is one plain name whose resolved path stays inside ``base``."""
    parts = Path(name).parts
    if (not name or "\0" in name or name in (".", "..") or len(parts) != 1 or parts[0] != name
            or "/" in name or "\\" in name or Path(name).is_absolute()):
        raise AblateError(f"{name!r} cannot name a folder inside {base}: it must be one plain file name, "
                          "not a path (a study name is letters, digits, '.', '_' and '-')")
    folder = base / name
    root = base.resolve()
    if not folder.resolve().is_relative_to(root):
        raise AblateError(f"{name!r}: the folder {folder} resolves to {folder.resolve()}, outside {root}; "
                          "remove that link or choose another --out folder")
    return folder


def writable_folder(folder: Path, option: str, *, create: bool = True) -> Path:
    """``folder``, or an AblateError starting with ``option`` (the flag and its value) unless it is (or,
    with ``create``, can be made) a folder this process can write in. Checked before any work, leaving
    nothing behind: a probe file is made and removed in the folder, or in the nearest folder above it."""
    import tempfile

    existing = folder
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if existing != folder and not create:
        raise AblateError(f"{option}: the folder {folder} does not exist; create it first or choose "
                          "another path")
    if not existing.is_dir():
        what = "a file, not a folder" if existing.is_file() else "not a folder"
        raise AblateError(f"{option}: {existing} is {what}; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ablate-write-check-"):
            pass
    except OSError as e:
        raise AblateError(f"{option}: cannot write in {existing} ({e.strerror or e}); "
                          "choose another path") from None
    return folder


# --------------------------------------------------------------------------------------
# Identity of a study
# --------------------------------------------------------------------------------------


def spec_document(spec: StudySpec) -> dict[str, Any]:
    """The resolved spec as a JSON-able dict (kept in the Optuna study, logged to MLflow)."""
    return spec.model_dump(mode="json")


def spec_hash(spec: StudySpec) -> str:
    """A short hash of what decides a study's trials.

    Left out: a search's trial budget, and a suite's seeds and report settings. So more seeds or
    a larger budget extend the same study, and a changed run setting starts a new one.
    """
    doc = spec.identity()
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def study_name(spec: StudySpec) -> str:
    """The Optuna study name: the spec's name and the hash of its resolved settings."""
    return f"{spec.name}-{spec_hash(spec)}"
