"""Dataset extras: named producers of further per-sample fields that model heads need in training
(a second augmented view, label sentences, entity masking weights; see ``fvlm.model.heads``).

A producer is ``produce(dataset, index, sample, case, rng) -> dict[str, Tensor]``: ``dataset`` the
:class:`~pipelines.cases.dataset.CaseDataset`, ``index`` the item, ``sample`` the base sample's fields (read
only), ``case`` its ``case.json``, ``rng`` a ``numpy`` generator of its own (None in evaluation). The
fields it returns must have a fixed shape per dataset (they are stacked by the default collate). The
trainer turns on the extras that the model's heads name (``FVLM.data_extras``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["register_extra", "register_extra_factory", "get_extra", "list_extras"]

Producer = Callable[..., dict[str, Any]]
_REGISTRY: dict[str, Producer] = {}
#: name -> factory(**options) -> producer, for extras a recipe parameterises (``fvlm.model.heads.extra_name``)
_FACTORIES: dict[str, Callable[..., Producer]] = {}
_BUILT: dict[str, Producer] = {}

#: modules that register the built-in extras on import
_BUILTIN: tuple[str, ...] = (
    "pipelines.train.extras.views",
    "pipelines.train.extras.labels",
    "pipelines.train.extras.entity",
    "pipelines.train.extras.tasks",
)


def register_extra(name: str, producer: Producer | None = None, *, overwrite: bool = False):
    """Register ``producer`` under ``name`` (usable as a decorator)."""

    def _register(f: Producer) -> Producer:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"dataset extra {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = f
        return f

    return _register if producer is None else _register(producer)


def register_extra_factory(name: str, factory: Callable[..., Producer], *, overwrite: bool = False) -> None:
    """Let extra ``name`` take options: ``get_extra("name?key=value&...")`` (the form of
    ``fvlm.model.heads.extra_name``) returns ``factory(key=value, ...)``, built once per distinct name. The
    plain ``name`` stays the producer registered with :func:`register_extra`."""
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"dataset extra factory {name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = factory


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def list_extras() -> list[str]:
    """Names of the registered dataset extras, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_extra(name: str) -> Producer:
    """The producer registered as ``name``; ValueError naming the registered ones otherwise."""
    _load_builtin()
    if "?" in name:  # a parameterised extra (fvlm.model.heads.extra_name)
        from fvlm.model.heads import parse_extra_name

        base, options = parse_extra_name(name)
        if base not in _FACTORIES:
            raise ValueError(f"dataset extra {base!r} takes no options (asked for {name!r}); extras with options: "
                             f"{', '.join(sorted(_FACTORIES)) or 'none'}")
        if name not in _BUILT:
            try:
                _BUILT[name] = _FACTORIES[base](**options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"dataset extra {name!r}: {e}") from None
        return _BUILT[name]
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset extra {name!r}; registered: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]
