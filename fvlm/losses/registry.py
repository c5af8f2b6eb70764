"""Objective registry: ``create_objective(name, **options)``, ``list_objectives()``, ``register_objective``.

An objective is an ``nn.Module`` whose ``forward`` takes the model's output dict and the batch fields by
keyword (``objective(**model_out, **batch)``), ignores keys it does not use, and returns a dict of named
loss terms (``{"anatomy_contrastive": tensor}``); ``objective.terms`` lists those names. The trainer sums
the terms named in the recipe, each with its weight. New objectives plug in by being registered; they are
then tested by ``tests/fvlm/test_zoo.py`` without further code (finite loss and gradient on a tiny batch).

The functions below are thin wrappers around :data:`OBJECTIVES`, a :class:`fvlm.registry.Registry`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from fvlm.registry import Registry

__all__ = ["OBJECTIVES", "register_objective", "create_objective", "list_objectives", "objective_defaults"]

#: name -> objective class or factory, with its default options
OBJECTIVES: Registry[Callable[..., nn.Module]] = Registry("objective")


def register_objective(
    name: str,
    factory: Callable[..., nn.Module] | None = None,
    *,
    defaults: dict[str, Any] | None = None,
    overwrite: bool = False,
    help: str | None = None,
):
    """Register ``factory`` (an ``nn.Module`` class or a function returning one) under ``name``.

    ``defaults`` are options applied before the caller's overrides, so one class can be registered
    under several names (``anatomy_infonce`` is ``anatomy_contrastive`` with its positives switched off).
    ``help``: a one-line description (default: the first line of the factory's docstring).
    Usable as a decorator: ``@register_objective("my_loss")``.
    """
    return OBJECTIVES.register(name, factory, defaults=defaults, overwrite=overwrite, help=help)


def list_objectives() -> list[str]:
    """Names of the registered objectives, sorted."""
    return OBJECTIVES.names()


def objective_defaults(name: str) -> dict[str, Any]:
    """The default options registered with ``name`` (a copy)."""
    return OBJECTIVES.defaults(name)


def create_objective(name: str, **options: Any) -> nn.Module:
    """Build the objective registered as ``name``; ``options`` override its registered defaults."""
    return OBJECTIVES.create(name, **options)
