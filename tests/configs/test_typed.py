"""The generic typed loader: values checked by field type, unknown keys named, ``--set`` typed by the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from configs.checks import ConfigError
from configs.typed import SCHEMA, apply_overrides, build, field_docs, load_yaml_text


@dataclass
class Inner:
    """A nested section."""

    size: tuple[int, int, int] = (1, 2, 3)
    """Three integers."""
    axes: tuple[int, ...] = ()
    """Any number of integers."""
    rate: float = 0.5
    """A number."""


@dataclass
class Item:
    """A list entry."""

    name: str = "a"
    """Its name."""
    weight: float = 1.0
    """Its weight."""


@dataclass
class Outer:
    """The root."""

    seed: int = 0
    """An integer."""
    on: bool = True
    """A flag."""
    label: str = "x"
    """Text, taken as is from --set."""
    limit: int | None = None
    """Optional integer."""
    mode: Literal["crop", "resize"] = "crop"
    """One of two."""
    inner: Inner = field(default_factory=Inner)
    """A section."""
    items: list[Item] = field(default_factory=list)
    """Sections in a list."""
    options: dict[str, Any] = field(default_factory=dict)
    """Untyped options."""
    typed_options: dict[str, Any] = field(default_factory=dict, metadata={SCHEMA: lambda: Inner})
    """A mapping of overrides of an Inner, typed through the schema."""

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


def test_a_mapping_builds_typed_sections() -> None:
    cfg = build(Outer, {"seed": 3, "inner": {"size": [4, 5, 6], "rate": 1}, "items": [{"name": "b"}], "limit": None})
    assert cfg == Outer(seed=3, inner=Inner(size=(4, 5, 6), rate=1.0), items=[Item(name="b")])
    assert isinstance(cfg.inner.size, tuple) and isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize("data, message", [
    ({"seed": "3"}, r"f\.yaml: seed must be an integer, got '3'"),
    ({"seed": True}, r"seed must be an integer, got True"),
    ({"on": "yes"}, r"on must be true or false, got 'yes'"),
    ({"label": 3}, r"label must be a string, got 3"),
    ({"limit": 2.5}, r"limit must be null or an integer, got 2\.5"),
    ({"mode": "zoom"}, r"mode must be one of 'crop', 'resize', got 'zoom'"),
    ({"inner": {"size": [1, 2]}}, r"inner\.size must be a list of 3 integers, got \[1, 2\]"),
    ({"inner": {"size": [1, 2, "x"]}}, r"inner\.size\[2\] must be an integer, got 'x'"),
    ({"inner": {"axes": 2}}, r"inner\.axes must be a list of integers, got 2"),
    ({"inner": {"rate": "fast"}}, r"inner\.rate must be a number, got 'fast'"),
    ({"inner": 3}, r"inner must be a mapping, got int"),
    ({"items": [{"weight": "heavy"}]}, r"items\[0\]\.weight must be a number, got 'heavy'"),
    ({"options": [1]}, r"options must be a mapping, got \[1\]"),
    ({"seed": -1}, r"f\.yaml: seed must be >= 0, got -1"),
])
def test_a_wrong_value_names_file_and_dotted_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(Outer, data, where="f.yaml")


def test_unknown_keys_list_the_known_fields() -> None:
    known = r"f\.yaml: unknown field\(s\) inner\.rat; known fields of inner: axes, rate, size"
    with pytest.raises(ConfigError, match=known):
        build(Outer, {"inner": {"rat": 1}}, where="f.yaml")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) bogus; known fields: inner, items, label"):
        build(Outer, {"bogus": 1})


def test_overrides_are_read_as_the_field_type() -> None:
    data = apply_overrides(Outer, {"inner": {"rate": 0.1}}, [
        "seed=7", "label=true", "inner.rate=3e-4", "inner.size=[4, 5, 6]", "limit=null", "on=false",
        "options.lr=3e-4", "options.deep.k=2", "typed_options.rate=1e-3", "items=[{name: c, weight: 2e-1}]"])
    assert data == {"seed": 7, "label": "true", "inner": {"rate": 3e-4, "size": [4, 5, 6]}, "limit": None,
                    "on": False, "options": {"lr": 3e-4, "deep": {"k": 2}}, "typed_options": {"rate": 1e-3},
                    "items": [{"name": "c", "weight": 0.2}]}
    cfg = build(Outer, data)
    assert cfg.inner.size == (4, 5, 6) and cfg.label == "true" and cfg.items == [Item("c", 0.2)]


@pytest.mark.parametrize("item, message", [
    ("seed=2.5", r"--set 'seed=2\.5': seed must be an integer, got '2\.5'"),
    ("inner.rate=fast", r"inner\.rate must be a number, got 'fast'"),
    ("on=maybe", r"on must be true or false, got 'maybe'"),
    ("inner.rat=1", r"unknown field inner\.rat; known fields of inner: axes, rate, size"),
    ("typed_options.rat=1", r"unknown field typed_options\.rat; known fields of typed_options: axes, rate, size"),
    ("seed.x=1", r"seed is an integer, not a section"),
    ("items.0.name=x", r"items is a list of mappings, not a section: set it whole"),
    ("seed", r"expected KEY=VALUE"),
    ("inner..rate=1", r"empty key part"),
])
def test_a_bad_override_names_itself(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Outer, {"items": [{"name": "a"}]}, [item])


def test_yaml_values_read_exponents_as_numbers() -> None:
    assert load_yaml_text("[3e-4, 1E5, 1.0e-3, 2, abc, .5]") == [3e-4, 1e5, 1e-3, 2, "abc", 0.5]


def test_field_docs_are_read_from_the_source() -> None:
    assert field_docs(Inner) == {"size": "Three integers.", "axes": "Any number of integers.", "rate": "A number."}


def _sections(cls: type) -> list[type]:
    """``cls`` and every dataclass its fields hold (directly or in a list)."""
    import typing

    out = [cls]
    for hint in typing.get_type_hints(cls).values():
        for t in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(t) and t not in out:
                out += [s for s in _sections(t) if s not in out]
    return out


def test_every_recipe_and_model_field_has_a_one_line_doc() -> None:
    """The config trees document each field beside it (one line at least), as the issue asks."""
    from fvlm.model.config import ModelConfig
    from pipelines.config.recipe import TrainConfig

    missing = [f"{s.__name__}.{f.name}" for root in (TrainConfig, ModelConfig) for s in _sections(root)
               for f in dataclasses.fields(s) if f.name not in field_docs(s)]
    assert not missing, f"fields without a doc line: {missing}"
