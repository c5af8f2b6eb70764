"""Objective registry: ``create_objective(name, **options)``, ``list_objectives()``, ``register_objective``.

An objective is an ``nn.Module`` whose ``forward`` takes the model's output dict and the batch fields by
keyword (``objective(**model_out, **batch)``), ignores keys it does not use, and returns a dict of named
loss terms (``{"anatomy_contrastive": tensor}``); ``objective.terms`` lists those names. The trainer sums
the terms named in the recipe, each with its weight. New objectives plug in by being registered.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

__all__ = ["register_objective", "create_objective", "list_objectives", "objective_defaults"]

#: name -> (factory, default options)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {}


def register_objective(
    name: str,
    factory: Callable[..., nn.Module] | None = None,
    *,
    defaults: dict[str, Any] | None = None,
    overwrite: bool = False,
):
    """Register ``factory`` (an ``nn.Module`` class or a function returning one) under ``name``.

    ``defaults`` are options applied before the caller's overrides, so one class can be registered
    under several names (``anatomy_infonce`` is ``anatomy_contrastive`` with its positives switched off).
    Usable as a decorator: ``@register_objective("my_loss")``.
    """

    def _register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not name or not isinstance(name, str):
            raise ValueError(f"objective name must be a non-empty string, got {name!r}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"objective {name!r} is already registered; pass overwrite=True to replace it")
        _check_options(name, f, defaults or {})
        _REGISTRY[name] = (f, dict(defaults or {}))
        return f

    return _register if factory is None else _register(factory)


def list_objectives() -> list[str]:
    """Names of the registered objectives, sorted."""
    return sorted(_REGISTRY)


def objective_defaults(name: str) -> dict[str, Any]:
    """The default options registered with ``name`` (a copy)."""
    return dict(_lookup(name)[1])


def create_objective(name: str, **options: Any) -> nn.Module:
    """Build the objective registered as ``name``; ``options`` override its registered defaults."""
    factory, defaults = _lookup(name)
    _check_options(name, factory, options)
    return factory(**{**defaults, **options})


def _lookup(name: str) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; registered objectives: {', '.join(list_objectives())}")
    return _REGISTRY[name]


def _check_options(name: str, factory: Callable[..., nn.Module], options: dict[str, Any]) -> None:
    """Reject options the factory does not take, naming the ones it does."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        known = ", ".join(k for k in params if k != "self")
        raise ValueError(f"objective {name!r} has no option {', '.join(map(repr, unknown))}; its options: {known}")
