"""Dataset extras: named producers of further per-sample fields that model heads need in training
(a second augmented view, label sentences, entity masking weights; see ``fvlm.model.heads``).

A producer is ``produce(dataset, index, sample, case, rng) -> dict[str, Tensor]``: ``dataset`` the
:class:`~pipelines.train.data.CaseDataset`, ``index`` the item, ``sample`` the base sample's fields (read
only), ``case`` its ``case.json``, ``rng`` a ``numpy`` generator of its own (None in evaluation). The
fields it returns must have a fixed shape per dataset (they are stacked by the default collate). The
trainer turns on the extras that the model's heads name (``FVLM.data_extras``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["register_extra", "get_extra", "list_extras"]

Producer = Callable[..., dict[str, Any]]
_REGISTRY: dict[str, Producer] = {}

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
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset extra {name!r}; registered: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]
