"""One registry type for every pluggable kind: model encoders, heads, objectives, zero-shot scorers, prompt
template sets, dataset extras, segmenters, series selection rules, synthetic finding signatures (timm
``_registry.py``).

A :class:`Registry` maps names to objects (usually a class or a factory function). Each kind keeps its own
public functions (``register_objective``, ``create_objective``, ``list_objectives``, ...) as thin wrappers
around one instance, so what differs between the kinds is data (their label, their built-in modules), not
code::

    OBJECTIVES = Registry("objective")

    @OBJECTIVES.register("clip_global")          # or OBJECTIVES.register("clip_global", ClipGlobal)
    class ClipGlobal(nn.Module): ...

    OBJECTIVES.create("clip_global", term="x")   # ClipGlobal(term="x"), the options checked first
    OBJECTIVES.names()                           # ["anatomy_contrastive", "clip_global", ...]
    OBJECTIVES.help_lines()                      # ["anatomy_contrastive  fVLM's anatomy-wise ...", ...]

What it does once for every kind:

- registration by decorator or call; a name registered twice is an error unless ``overwrite=True``;
- ``create(name, *args, **options)``: an unknown name is an error listing the registered ones; the options are
  checked against the factory's signature before it is called (unknown ones and missing required ones are
  errors naming the factory's options), ``args`` being what the caller always passes first (the model config
  of a head, the section config of an encoder); options registered as ``defaults`` come before the caller's;
- a one-line ``help`` per entry (default: the first line of the object's docstring) so that CLI epilogs and
  docs are built from the registry and cannot go stale;
- built-in modules imported by name on the first lookup (``builtin=``), so that a registry finds entries
  registered by modules nobody imported yet, without an import statement (no import circle between the
  registry's module and the modules that register into it).

A registry is a read-only ``Mapping`` of name -> registered object (in registration order). It holds no
domain content and imports nothing of the project, so every layer above ``anatomy`` may use it; it lives in
``fvlm`` (not ``anatomy``) because no ``anatomy`` module has a pluggable kind and project plumbing belongs
outside the anatomy floor (issue 18 item 4).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Entry", "Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name."""

    name: str
    obj: T
    """What was registered: a class, a factory function or a plain object (a dataset-extra producer)."""
    help: str = ""
    """One line for listings and CLI epilogs."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Options applied before the caller's in :meth:`Registry.create`."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Whatever else the kind records per entry (e.g. the fields a dataset extra produces)."""


def _first_line(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring's first paragraph, on one line ("" without a docstring), without
    a pointer to the module docstring ("; see the module docstring", "(module docstring)"), which says nothing
    in a listing."""
    paragraph = (inspect.getdoc(obj) or "").strip().split("\n\n")[0]
    line = re.split(r"(?<=\.)\s+(?=[A-Z`(])", " ".join(paragraph.split()), maxsplit=1)[0]
    return re.sub(r"(;\s*see the module docstring|\s*\(module docstring\))(?=[.:;]?$)", "", line)


class Registry(Mapping[str, T]):
    """Named objects of one pluggable kind (module docstring).

    Args:
        kind: what an entry is, for messages (``"objective"``, ``"zero-shot scorer"``).
        plural: its plural (default ``kind + "s"``).
        where: the config path the names live under, for messages (``"model.heads"``): errors then start with
            ``"model.heads: ..."`` / ``"model.heads.<name>: ..."`` instead of naming the kind.
        builtin: modules imported (once, by name) before the first lookup; each registers its entries.
        error: the exception type of unknown names and bad options (a ``ValueError`` subclass).
    """

    def __init__(self, kind: str, *, plural: str | None = None, where: str = "", builtin: Sequence[str] = (),
                 error: type[Exception] = ValueError) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.where = where
        self.builtin = tuple(builtin)
        self.error = error
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = not self.builtin

    # ------------------------------------------------------------------------------------- registration

    def register(self, name: str, obj: T | None = None, *, help: str | None = None,
                 defaults: Mapping[str, Any] | None = None, overwrite: bool = False, **meta: Any):
        """Register ``obj`` under ``name``; without ``obj``, a decorator that registers what it decorates.

        ``help``: the entry's one-line description (default: the first docstring line of ``obj``);
        ``defaults``: options :meth:`create` applies before the caller's (checked against ``obj``'s
        signature now); ``meta``: anything else to keep with the entry (:meth:`entry`). Returns ``obj``.
        """

        def _register(o: T) -> T:
            if not name or not isinstance(name, str):
                raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
            if name in self._entries and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
            if defaults:
                self._check(name, o, dict(defaults), 0, required=False)
            self._entries[name] = Entry(name, o, _first_line(o) if help is None else str(help),
                                        dict(defaults or {}), dict(meta))
            return o

        return _register if obj is None else _register(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a probe entry clean up with this); absent names are ignored."""
        self._entries.pop(name, None)

    # ------------------------------------------------------------------------------------------ lookup

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: the modules register through this registry while they load
            try:
                for module in self.builtin:
                    importlib.import_module(module)
            except BaseException:
                self._loaded = False
                raise

    def names(self) -> list[str]:
        """The registered names, sorted (what every ``list_x()`` returns)."""
        self._load()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        """The :class:`Entry` of ``name``; ``error`` listing the registered names when there is none."""
        self._load()
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name]

    def get_obj(self, name: str) -> T:
        """The object registered as ``name`` (as :meth:`entry`, for its ``obj``)."""
        return self.entry(name).obj

    def defaults(self, name: str) -> dict[str, Any]:
        """The default options registered with ``name`` (a copy)."""
        return dict(self.entry(name).defaults)

    def unknown(self, name: Any) -> Exception:
        """The error for an unknown ``name``: what was asked for and what is registered."""
        self._load()
        prefix = f"{self.where}: " if self.where else ""
        return self.error(f"{prefix}unknown {self.kind} {name!r}; registered {self.plural}: "
                          f"{', '.join(sorted(self._entries)) or 'none'}")

    # Mapping: name -> object, in registration order (a missing name is a KeyError, as for any mapping)
    def __getitem__(self, name: str) -> T:
        self._load()
        return self._entries[name].obj

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"

    # -------------------------------------------------------------------------------------- creation

    def label(self, name: str) -> str:
        """How messages name entry ``name``: ``model.heads.region`` or ``objective 'clip_global'``."""
        return f"{self.where}.{name}" if self.where else f"{self.kind} {name!r}"

    def options(self, name: str, positional: int = 0) -> list[str] | None:
        """The option names the factory of ``name`` takes after its first ``positional`` arguments (None:
        any, the factory takes ``**options``)."""
        return _options(self.get_obj(name), positional)

    def check_options(self, name: str, options: Mapping[str, Any], positional: int = 0) -> None:
        """Raise ``error`` when ``options`` (with the registered defaults) do not fit the factory of ``name``
        called with ``positional`` leading arguments: unknown options, or required ones missing."""
        e = self.entry(name)
        self._check(name, e.obj, {**e.defaults, **options}, positional)

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """``factory(*args, **{**defaults, **options})`` for the factory registered as ``name``, the options
        checked first (:meth:`check_options`)."""
        e = self.entry(name)
        merged = {**e.defaults, **options}
        self._check(name, e.obj, merged, len(args))
        return e.obj(*args, **merged)  # type: ignore[operator]

    def _check(self, name: str, factory: Any, options: dict[str, Any], positional: int,
               required: bool = True) -> None:
        params = _parameters(factory, positional)
        if params is None:
            return
        known = [p.name for p in params]
        unknown = [k for k in options if k not in known]
        if unknown:
            raise self.error(f"{self.label(name)}: unknown option(s) {', '.join(sorted(unknown))}; "
                             f"its options: {', '.join(known) or 'none'}")
        missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options]
        if required and missing:
            raise self.error(f"{self.label(name)}: missing option(s) {', '.join(missing)}; "
                             f"its options: {', '.join(known)}")

    # --------------------------------------------------------------------------------------- listings

    def help_lines(self, indent: str = "  ") -> list[str]:
        """``"<indent><name>  <help>"`` per entry, sorted, names padded to one column (for CLI epilogs)."""
        names = self.names()
        width = max((len(n) for n in names), default=0)
        return [f"{indent}{n.ljust(width)}  {self._entries[n].help}".rstrip() for n in names]


def _parameters(factory: Any, positional: int) -> list[inspect.Parameter] | None:
    """The keyword parameters of ``factory`` after its first ``positional`` positional ones; None when it takes
    ``**kwargs`` (any option) or has no inspectable signature."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    out, skipped = [], 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if skipped < positional and p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                               inspect.Parameter.POSITIONAL_OR_KEYWORD):
            skipped += 1
            continue
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            continue
        out.append(p)
    return out


def _options(factory: Any, positional: int) -> list[str] | None:
    params = _parameters(factory, positional)
    return None if params is None else [p.name for p in params]
