"""Typed configs: nested dataclasses read from mappings by one loader, and ``--set a.b=c`` typed by the field.

A config section is a dataclass whose fields each carry a type and a one-line doc (the string right under
the field, as torchtitan's ``Trainer.Config``); ranges and relations between fields are checked in its
``__post_init__``. :func:`build` turns a parsed mapping into such a tree: unknown keys are errors listing the
known fields, each value is checked against its field's type (``int``, ``float`` - an integer is taken -,
``bool``, ``str``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``,
``Literal[...]``, a nested dataclass, ``Any``; a field with ``metadata={CHECK: fn}`` is checked by ``fn``),
lists become tuples where the field is a tuple, and every error names the file and the dotted field
(``recipe.yaml: optim.lr must be a number, got 'fast'``).

:func:`apply_overrides` applies ``KEY=VALUE`` strings to a mapping before :func:`build`: the dotted key is
walked through the dataclass fields (an unknown one is an error listing the known fields) and the text is read
as the target field's type - ``str`` fields take the text as is, ``int`` and ``float`` fields parse it as a
number (``3e-4`` included), ``bool`` fields take ``true``/``false``, optional fields ``null``; containers and
untyped values are read as YAML (whose floats here include ``3e-4``). A field may name the dataclass that
types the keys below it with ``field(metadata={SCHEMA: SomeConfig})`` (e.g. a mapping of overrides of a
model config), so ``--set model.overrides.vision.dropout=0.1`` is typed by ``VisionConfig.dropout``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import re
import textwrap
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from configs.checks import ConfigError

__all__ = ["SCHEMA", "CHECK", "build", "apply_overrides", "parse_value", "field_docs", "describe_type", "load_yaml_text"]

#: ``dataclasses.field`` metadata key: the dataclass (or a function returning it, to import it lazily) that types
#: the keys below an untyped mapping field for :func:`apply_overrides`.
SCHEMA = "schema"


#: ``dataclasses.field`` metadata key: a function ``(value, dotted) -> value`` that checks and converts the field's
#: value instead of its type (for a field whose own message says more, e.g. a list of HU windows).
CHECK = "check"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``3e-4`` and ``1E5`` are numbers, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml_text(text: str) -> Any:
    """Parse a YAML value given on a command line (``[1, 2]``, ``{k: v}``, ``3e-4``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def describe_type(hint: Any) -> str:
    """A reader's name for a field type: ``an integer``, ``a list of 3 integers``, ``null or a number``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return "any value"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return ("null or " if type(None) in args else "") + " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}" if len(set(args)) == 1 else "a list " + str(list(args))
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "mappings"
    if get_origin(hint) is tuple:
        return "lists"
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(hint, describe_type(hint))


#: Scalar field type -> whether a parsed value has it (a bool is no number; an integer is a float's value).
_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _value(hint: Any, value: Any, dotted: str, error: type[ConfigError]) -> Any:
    """``value`` checked against (and, for tuples and floats, converted to) ``hint``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, f"{dotted}.", error)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _value(option, value, dotted, error)
            except ConfigError:
                if len(options) == 1:
                    break
        raise error(f"{dotted} must be {describe_type(hint)}, got {value!r}")
    bad = error(f"{dotted} must be {describe_type(hint)}, got {value!r}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise bad
    if hint in _SCALARS:
        if not _SCALARS[hint](value):
            raise bad
        return float(value) if hint is float else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], v, f"{dotted}[{i}]", error) for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise bad
        return tuple(_value(a, v, f"{dotted}[{i}]", error) for i, (a, v) in enumerate(zip(args, value))) \
            if args else tuple(value)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise bad
        return [_value(args[0], v, f"{dotted}[{i}]", error) for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise bad
        if not args:
            return value
        return {_value(args[0], k, f"{dotted} key", error): _value(args[1], v, f"{dotted}.{k}", error)
                for k, v in value.items()}
    if isinstance(hint, type) and not isinstance(value, hint):
        raise bad
    return value


def _build(cls: type, data: Any, prefix: str, error: type[ConfigError]) -> Any:
    if not isinstance(data, dict):
        raise error(f"{prefix[:-1] or 'config'} must be a mapping, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        bad = ", ".join(f"{prefix}{k}" for k in unknown)
        raise error(f"unknown field(s) {bad}; known fields{' of ' + prefix[:-1] if prefix else ''}: "
                    f"{', '.join(sorted(known))}")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise error(f"missing field(s) {', '.join(prefix + m for m in missing)}")
    hints = get_type_hints(cls)
    checks = {f.name: f.metadata[CHECK] for f in dataclasses.fields(cls) if CHECK in f.metadata}
    kwargs = {key: checks[key](value, f"{prefix}{key}") if key in checks else
              _value(hints[key], value, f"{prefix}{key}", error) for key, value in data.items()}
    section = prefix[:-1]
    try:
        return cls(**kwargs)
    except TypeError as e:  # a comparison in __post_init__ on a value the types let through
        raise error(f"{section or 'config'}: {e}") from None
    except ConfigError as e:  # a check of __post_init__: name the section unless its message does
        head = re.split(r"[: ]", str(e), maxsplit=1)[0]
        if section and section.split("[")[0].rsplit(".", 1)[-1] not in head:
            raise type(e)(f"{section}: {e}") from None
        raise


def build(cls: type, data: Any, where: str = "", error: type[ConfigError] = ConfigError) -> Any:
    """An instance of the dataclass ``cls`` from a mapping, nested sections and lists of sections included.

    Unknown keys, values of the wrong type and the section's own ``__post_init__`` checks raise ``error``,
    prefixed by ``where`` (the file) when given: ``where: optim.lr must be a number, got 'fast'``."""
    try:
        return _build(cls, data, "", error)
    except ConfigError as e:
        if not where:
            raise
        raise type(e)(f"{where}: {e}") from None


def _field(cls: type, name: str, dotted: str, error: type[ConfigError]) -> tuple[Any, Any]:
    """(type, schema) of field ``name`` of dataclass ``cls``; an unknown name lists the known ones."""
    found = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if name not in found:
        section = dotted.rpartition(".")[0]
        raise error(f"unknown field {dotted}; known fields{' of ' + section if section else ''}: "
                    f"{', '.join(sorted(found))}")
    schema = found[name].metadata.get(SCHEMA)
    if schema is not None and not isinstance(schema, type):
        schema = schema()  # a function that imports the schema lazily
    return get_type_hints(cls)[name], schema


def _below(hint: Any, schema: Any, key: str, dotted: str, error: type[ConfigError]) -> tuple[Any, Any]:
    """(type, schema) of ``key`` inside a value of type ``hint``: a dataclass' field, a mapping's values."""
    if schema is not None:
        return _field(schema, key, dotted, error)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        hint, origin, args = options[0], get_origin(options[0]), get_args(options[0])
    if dataclasses.is_dataclass(hint):
        return _field(hint, key, dotted, error)
    if origin is dict or hint is dict:
        return (args[1] if args else Any), None
    if hint is Any:
        return Any, None
    raise error(f"{dotted.rpartition('.')[0]} is {describe_type(hint)}, not a section: set it whole")


def parse_value(hint: Any, text: str, dotted: str, error: type[ConfigError] = ConfigError) -> Any:
    """The command-line text of ``--set dotted=text`` read as the field's type (see the module docstring)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:
        if text.strip() in ("null", "~", "None", "none", "Null", "NULL"):
            return None
        options = [a for a in args if a is not type(None)]
        hint = options[0] if len(options) == 1 else Any
    if hint is str:
        return text
    if hint in (int, float):
        try:
            return hint(text.strip())
        except ValueError:
            raise error(f"{dotted} must be {describe_type(hint)}, got {text!r}") from None
    if hint is bool:
        value = load_yaml_text(text)
        if not isinstance(value, bool):
            raise error(f"{dotted} must be true or false, got {text!r}")
        return value
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as e:
        raise error(f"{dotted}: {text!r} is not valid YAML: {e}") from None


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str] | tuple[str, ...] | None,
                    error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A copy of the mapping ``data`` (to be built as ``cls``) with ``KEY=VALUE`` overrides applied, each value
    read as the type of the field its dotted key names (:func:`parse_value`); later overrides win."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise error(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise error(f"--set {item!r}: empty key part")
        try:
            hint, schema = cls, None
            node = out
            for i, part in enumerate(parts):
                dotted = ".".join(parts[: i + 1])
                hint, schema = _below(hint, schema, part, dotted, error)
                if i < len(parts) - 1:
                    if node.get(part) is None:
                        node[part] = {}
                    if not isinstance(node[part], dict):
                        raise error(f"{dotted} is {describe_type(hint)}, not a section: set it whole")
                    node = node[part]
            node[parts[-1]] = parse_value(hint, text, key.strip(), error)
        except ConfigError as e:
            raise type(e)(f"--set {item!r}: {e}") from None
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the first line of the string literal right under the field in ``cls``'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value.strip().splitlines()[0]
    return docs
