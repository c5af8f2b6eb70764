"""Dataset extras: named producers of further per-sample fields that model heads need in training
(a second augmented view, label sentences, entity masking weights; see ``fvlm.model.heads``).

A producer is ``produce(dataset, index, sample, case, rng) -> dict[str, Tensor]``: ``dataset`` the
:class:`~pipelines.cases.dataset.CaseDataset`, ``index`` the item, ``sample`` the base sample's fields (read
only), ``case`` its ``case.json``, ``rng`` a ``numpy`` generator of its own (None in evaluation). The
fields it returns must have a fixed shape per dataset (they are stacked by the default collate). The
trainer turns on the extras that the model's heads name (``FVLM.data_extras``). The functions below are thin
wrappers around :data:`EXTRAS` and :data:`EXTRA_FACTORIES` (:class:`fvlm.registry.Registry`).
"""

from __future__ import annotations

from typing import Any, Callable

from fvlm.registry import Registry

__all__ = ["EXTRAS", "EXTRA_FACTORIES", "register_extra", "register_extra_factory", "get_extra", "list_extras",
           "extra_keys"]

Producer = Callable[..., dict[str, Any]]

#: name -> producer (not a factory: ``get_extra`` returns the registered object itself), with the fields it
#: produces (``meta["keys"]``); the built-in extras register on first lookup
EXTRAS: Registry[Producer] = Registry("dataset extra", builtin=(
    "pipelines.train.extras.views",
    "pipelines.train.extras.labels",
    "pipelines.train.extras.entity",
    "pipelines.train.extras.tasks",
))
#: name -> factory(**options) -> producer, for extras a recipe parameterises (``fvlm.model.heads.extra_name``)
EXTRA_FACTORIES: Registry[Callable[..., Producer]] = Registry("dataset extra factory", plural="dataset extras with options",
                                                             builtin=EXTRAS.builtin)
_BUILT: dict[str, Producer] = {}


def register_extra(name: str, producer: Producer | None = None, *, keys: tuple[str, ...] = (),
                   overwrite: bool = False, help: str | None = None):
    """Register ``producer`` under ``name`` (usable as a decorator). ``keys``: the fields it returns (every
    registered extra is tested to produce them, ``tests/pipelines/train/test_extras_zoo.py``)."""
    return EXTRAS.register(name, producer, overwrite=overwrite, help=help, keys=tuple(keys))


def register_extra_factory(name: str, factory: Callable[..., Producer], *, overwrite: bool = False) -> None:
    """Let extra ``name`` take options: ``get_extra("name?key=value&...")`` (the form of
    ``fvlm.model.heads.extra_name``) returns ``factory(key=value, ...)``, built once per distinct name. The
    plain ``name`` stays the producer registered with :func:`register_extra`."""
    EXTRA_FACTORIES.register(name, factory, overwrite=overwrite)


def list_extras() -> list[str]:
    """Names of the registered dataset extras, sorted."""
    return EXTRAS.names()


def extra_keys(name: str) -> tuple[str, ...]:
    """The fields extra ``name`` (or ``"name?options"``) produces, as registered."""
    return tuple(EXTRAS.entry(str(name).partition("?")[0]).meta.get("keys", ()))


def get_extra(name: str) -> Producer:
    """The producer registered as ``name``; ValueError naming the registered ones otherwise."""
    if "?" in name:  # a parameterised extra (fvlm.model.heads.extra_name)
        from fvlm.model.heads import parse_extra_name

        base, options = parse_extra_name(name)
        if base not in EXTRA_FACTORIES:
            raise ValueError(f"dataset extra {base!r} takes no options (asked for {name!r}); extras with options: "
                             f"{', '.join(EXTRA_FACTORIES.names()) or 'none'}")
        if name not in _BUILT:
            try:
                _BUILT[name] = EXTRA_FACTORIES.create(base, **options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"dataset extra {name!r}: {e}") from None
        return _BUILT[name]
    return EXTRAS.get_obj(name)
