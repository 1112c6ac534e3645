"""Losses: each loss is one class, and the class is its definition.

A built-in loss is a module of this package named after the loss (``infonce.py`` is ``loss =
"infonce"``); a user's loss is ``"path/to/file.py:ClassName"``, ``"package.module:ClassName"`` or an
installed package's entry point in the group ``ablate.losses``. Whatever its origin, ``resolve``
reads the same things from the class:

- its constructor's keyword arguments are the run fields it reads: a keyword that names a field of
  the run spec (``temperature``) reads it, with the spec's default; ``reads`` renames (run field ->
  keyword, e.g. ``{"learnable_temperature": "learnable"}``); any other keyword becomes a run field of
  its own, settable with ``--set`` and searchable, with the constructor's default;
- ``contrastive`` (default True): whether a sample's loss depends on the rest of its batch (such
  losses accumulate with GradCache and receive ligand ids to mask shared ligands);
- ``label``, for reports (default: the class name); ``components``, the parts it logs as
  ``train/loss_<part>``; ``logged()``, numbers it logs per epoch (a learned temperature);
- optionally ``check(spec)`` (a class method raising ValueError on settings that cannot work),
  ``stack(criteria)`` (how K members run at once on the member axis; without it, ``torch.func.vmap``
  for a loss that declares ``functional = True``, else one member at a time), and a schedule's
  ``get_loss(epoch)``, ``get_recommended_lr()``, ``epoch_fields``, ``replaces``, ``switches(spec)`` and
  ``last_stage_start(spec)``.

Its ``forward(pred, target, ligand_ids=None)`` takes ``[B, D]`` tensors and returns a scalar.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ablate.errors import AblateError

if TYPE_CHECKING:
    from torch import nn

    from ablate.losses._members import MemberLosses

__all__ = ["ENTRY_POINT_GROUP", "LossDefinition", "MemberLosses", "build", "build_loss", "builtin_names", "resolve"]

ENTRY_POINT_GROUP = "ablate.losses"
"""The entry-point group through which installed packages add losses."""

REQUIRED = inspect.Parameter.empty
"""The default of a constructor keyword that has none: the run must set it."""

_NOT_LOSS_SETTINGS = frozenset({"loss", "loss_args", "model", "data"})
"""Run fields a loss's constructor may not read (they are not settings of a loss)."""


_DECLARED = ("label", "contrastive", "reads", "epoch_fields", "replaces", "components")
"""The class attributes a loss may declare (see the module's docstring)."""


@dataclass(frozen=True)
class LossDefinition:
    """What the rest of ablate reads of a loss: its name, the run fields it reads and what its class declares.

    A built-in loss's definition is read from its module's source, so validating a run imports neither
    its class nor torch; ``cls`` imports the class when a loss is built.
    """

    name: str
    fields: dict[str, str]
    """Run field -> constructor keyword, for every keyword the constructor takes."""
    defaults: dict[str, Any]
    """Run field -> the constructor's default (``REQUIRED`` when it has none)."""
    annotations: dict[str, Any]
    """Run field -> the constructor's type hint for it (``Any`` when it has none)."""
    builtin: bool
    declared: dict[str, Any]
    """The class attributes among ``_DECLARED`` that the class sets."""
    has_check: bool
    load: Callable[[], type[nn.Module]] = field(repr=False, compare=False)

    @property
    def cls(self) -> type[nn.Module]:
        """The loss's class (imported on first use)."""
        return self.load()

    @property
    def contrastive(self) -> bool:
        """Whether a sample's loss depends on the rest of its batch."""
        return bool(self.declared.get("contrastive", True))

    @property
    def label(self) -> str:
        """How reports name the loss."""
        return str(self.declared.get("label", self.name))

    @property
    def epoch_fields(self) -> tuple[str, ...]:
        """Run fields counted in epochs, which ``--epochs`` scales with the run."""
        return tuple(self.declared.get("epoch_fields", ()))

    @property
    def replaces(self) -> tuple[str, ...]:
        """Run fields the loss makes unused (a schedule's own learning rates replace ``lr``)."""
        return tuple(self.declared.get("replaces", ()))

    def check(self, spec: Any) -> None:
        """Refuse settings that cannot work (ValueError), as the loss's class says (its ``check``, if any)."""
        if self.has_check:
            self.cls.check(spec)  # type: ignore[attr-defined]

    def switches(self, spec: Any) -> list[int]:
        """The epochs where a run of this loss switches its loss (a schedule's stages)."""
        switches = getattr(self.cls, "switches", None) if self.epoch_fields else None
        return list(switches(spec)) if switches is not None else []

    def last_stage_start(self, spec: Any) -> int:
        """The first epoch of the run's last stage (0 without stages)."""
        start = getattr(self.cls, "last_stage_start", None) if self.epoch_fields else None
        return int(start(spec)) if start is not None else 0

    def build(self, settings: dict[str, Any]) -> nn.Module:
        """The loss, from each run field's value (every field in ``fields``)."""
        kwargs = {self.fields[f]: v for f, v in settings.items() if f in self.fields}
        try:
            return self.cls(**kwargs)
        except AblateError:
            raise
        except Exception as e:  # a user's constructor: one line, naming the loss
            raise AblateError(f"loss {self.name!r}: its constructor raised {type(e).__name__}: {e}".splitlines()[0]
                              ) from None


@cache
def builtin_names() -> list[str]:
    """The built-in losses: the public modules of this package (found without importing them)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def installed_names() -> list[str]:
    """Losses that installed packages add through the ``ablate.losses`` entry points."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def resolve(name: str) -> LossDefinition:
    """The definition of a loss by name: built in, ``file.py:Class``, ``package.module:Class`` or an entry point."""
    if not isinstance(name, str) or not name.strip():
        raise AblateError(f"a loss is named by a non-empty string, got {name!r}")
    return _resolve(name)


@cache
def _resolve(name: str) -> LossDefinition:
    if name in builtin_names():
        return _register(_declared_builtin(name))
    if ":" in name:
        where, _, attr = name.rpartition(":")
        return _define(name, _attribute(_load(name, where), attr, name), builtin=False)
    installed = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if installed:
        try:
            loaded = installed[0].load()
        except Exception as e:
            raise AblateError(f"loss {name!r}: its entry point {installed[0].value} failed to load: "
                              f"{type(e).__name__}: {e}".splitlines()[0]) from None
        return _define(name, loaded, builtin=False)
    import difflib

    known = builtin_names() + installed_names()
    hint = difflib.get_close_matches(name, known, n=1)
    raise AblateError(
        f"unknown loss {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; choose one of "
        f"{', '.join(known)}, or give your own as \"path/to/file.py:ClassName\" or \"package.module:ClassName\"")


def known_fields() -> set[str]:
    """The run fields of every built-in loss and of every loss resolved in this process."""
    for name in builtin_names():
        resolve(name)
    return {f for definition in _RESOLVED.values() for f in definition.fields}


def build(spec: Any) -> nn.Module:
    """A run's loss, built from the run spec's fields (its own fields from ``spec.loss_args``)."""
    definition = resolve(spec.loss)
    return definition.build({f: spec.loss_args[f] if f in spec.loss_args else getattr(spec, f)
                             for f in definition.fields})


def build_loss(name: str, **params: Any) -> nn.Module:
    """A loss by name, with its constructor's keyword arguments (mse, cosine, infonce, combined, supcon, ...)."""
    definition = resolve(name)
    try:
        signature = inspect.signature(definition.cls)
        signature.bind(**params)
    except TypeError as e:
        raise AblateError(f"loss {name!r}: {e}") from None
    return definition.cls(**params)


def _load(name: str, where: str) -> Any:
    """The module of a user's loss: a Python file (``.py`` or a path) or an importable module."""
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise AblateError(f"loss {name!r}: no file {path} (a path is relative to the folder you run ablate in)")
        resolved = path.resolve()
        module_name = f"ablate_user_loss_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, resolved)
        if spec is None or spec.loader is None:
            raise AblateError(f"loss {name!r}: {path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise AblateError(f"loss {name!r}: {path} failed to load: {_where(e, resolved)}") from None
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise AblateError(f"loss {name!r}: no module {e.name!r} (install it, or give a file as "
                          "\"path/to/file.py:ClassName\")") from None
    except Exception as e:
        raise AblateError(f"loss {name!r}: module {where} failed to load: {type(e).__name__}: {e}".splitlines()[0]
                          ) from None


def _where(e: Exception, path: Path) -> str:
    """An exception raised while loading a user's file, with the line of that file it came from."""
    if isinstance(e, SyntaxError):
        return f"line {e.lineno}: {e.msg}"
    import traceback

    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
    at = f"line {lines[-1]}: " if lines else ""
    return f"{at}{type(e).__name__}: {e}".splitlines()[0]


def _attribute(module: Any, attr: str, name: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            import difflib

            from torch import nn

            classes = [k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)]
            hint = difflib.get_close_matches(part, classes, n=1)
            raise AblateError(f"loss {name!r}: {getattr(module, '__file__', module.__name__)} has no {part!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else
                                 f"; it defines {', '.join(classes)}" if classes else ""))
        obj = getattr(obj, part)
    return obj


def _define(name: str, cls: Any, *, builtin: bool) -> LossDefinition:
    """A loss class read as a definition; a class that cannot be one is refused in one line."""
    from torch import nn

    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise AblateError(f"loss {name!r} is {type(cls).__name__} {cls!r}, not a torch.nn.Module subclass; a loss is "
                          "a class with forward(pred, target, ligand_ids=None)")
    _check_forward(name, cls)
    renames: dict[str, str] = dict(getattr(cls, "reads", {}))
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    params = [(p.name, p.default, hints.get(p.name, _type_of(p.default)), p.kind)
              for p in inspect.signature(cls).parameters.values()]
    declared = {a: getattr(cls, a) for a in _DECLARED if a != "reads" and hasattr(cls, a)}
    declared.setdefault("label", cls.__name__)
    return _register(_definition(name, params, renames, declared, callable(getattr(cls, "check", None)),
                                 lambda: cls, builtin=builtin))


def _definition(name: str, params: list[tuple[str, Any, Any, Any]], renames: dict[str, str],
                declared: dict[str, Any], has_check: bool, load: Callable[[], type[nn.Module]], *,
                builtin: bool) -> LossDefinition:
    """A definition from a constructor's parameters (name, default, type, kind) and what the class declares."""
    field_of = {keyword: f for f, keyword in renames.items()}
    fields, defaults, annotations = {}, {}, {}
    for keyword, default, annotation, kind in params:
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if kind == inspect.Parameter.POSITIONAL_ONLY:
            raise AblateError(f"loss {name!r}: constructor argument {keyword!r} is positional-only; ablate passes "
                              "settings by keyword")
        f = field_of.get(keyword, keyword)
        if f in _NOT_LOSS_SETTINGS:
            raise AblateError(f"loss {name!r}: constructor argument {keyword!r} would read the run's {f!r}, "
                              "which is not a loss setting; rename it")
        fields[f], defaults[f], annotations[f] = keyword, default, annotation
    return LossDefinition(name, fields, defaults, annotations, builtin, declared, has_check, load)


def _type_of(default: Any) -> Any:
    return type(default) if default not in (REQUIRED, None) else Any


def _register(definition: LossDefinition) -> LossDefinition:
    _RESOLVED[definition.name] = definition
    return definition


_RESOLVED: dict[str, LossDefinition] = {}
"""Every loss resolved in this process, by name."""


def _declared_builtin(name: str) -> LossDefinition:
    """A built-in loss's definition, read from its module's source (its class is imported only when built).

    The module defines one public ``nn.Module`` class; its constructor's defaults and the attributes it
    declares are literals (a test checks that this reading equals the imported class's)."""
    tree = ast.parse(Path(__file__).with_name(f"{name}.py").read_text())
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")
               and any(ast.unparse(b).endswith("Module") for b in n.bases)]
    if len(classes) != 1:
        raise RuntimeError(f"ablate/losses/{name}.py must define exactly one public loss class, found {len(classes)}")
    node = classes[0]
    declared: dict[str, Any] = {"label": node.name}
    methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
    for item in node.body:
        target: ast.expr
        if isinstance(item, ast.AnnAssign) and item.value is not None:
            target, value = item.target, item.value
        elif isinstance(item, ast.Assign) and len(item.targets) == 1:
            target, value = item.targets[0], item.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in _DECLARED:
            declared[target.id] = ast.literal_eval(value)
    params: list[tuple[str, Any, Any, Any]] = []
    init = methods.get("__init__")
    if init is not None:
        a = init.args
        positional = a.args[1:]
        defaults = [REQUIRED] * (len(positional) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
        params += [(p.id if isinstance(p, ast.Name) else p.arg, d, _annotation(p.annotation, d),
                    inspect.Parameter.POSITIONAL_OR_KEYWORD) for p, d in zip(positional, defaults, strict=True)]
        params += [(p.arg, REQUIRED if d is None else ast.literal_eval(d), _annotation(p.annotation, None),
                    inspect.Parameter.KEYWORD_ONLY) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    class_name = node.name

    def load() -> type[nn.Module]:
        cls: type[nn.Module] = getattr(importlib.import_module(f"{__name__}.{name}"), class_name)
        return cls

    return _definition(name, params, dict(declared.pop("reads", {})), declared, "check" in methods, load,
                       builtin=True)


def _annotation(node: ast.expr | None, default: Any) -> Any:
    """A constructor argument's type hint from source (builtin types only), else the default's type."""
    if node is not None:
        try:
            return eval(ast.unparse(node), {"__builtins__": {"float": float, "int": int, "bool": bool, "str": str,
                                                             "tuple": tuple, "list": list, "dict": dict, "None": None}})
        except Exception:
            return Any
    return _type_of(default)


def _check_forward(name: str, cls: type) -> None:
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_ids = any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 3
    if (len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params)) or not takes_ids:
        raise AblateError(f"loss {name!r}: {cls.__name__}.forward must take (pred, target, ligand_ids=None), "
                          f"it takes ({', '.join(p.name for p in params)})")


def __getattr__(attr: str) -> Any:
    """The built-in loss classes (``ablate.losses.InfoNCELoss``) and ``MemberLosses``, imported on first use."""
    if attr == "MemberLosses":
        from ablate.losses._members import MemberLosses

        return MemberLosses
    if attr[:1].isupper():
        for name in builtin_names():
            module = importlib.import_module(f"{__name__}.{name}")
            if hasattr(module, attr):
                return getattr(module, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
