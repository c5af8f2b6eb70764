"""Optional model heads: extra learnable parts of :class:`fvlm.model.FVLM` that the related methods need
(docs/methods.md#how-the-methods-plug-in), built from ``ModelConfig.heads`` (name -> options) and saved/loaded
with the model.

A head is an ``nn.Module`` subclass of :class:`Head`. ``FVLM.forward`` calls every head of the model with
the model itself and a :class:`HeadContext` (the towers' intermediate tensors of this batch) plus the batch
fields the head declares in ``batch_keys``; the head returns a dict of extra outputs that are merged into
the model's output dict (the keys must not clash with ``OUTPUT_KEYS`` or another head's), where the
objectives read them by keyword. A head that needs extra per-sample fields from the training data (a second
augmented view, label sentences, entity masking weights) names the dataset extras in ``data_extras``
(``pipelines.train.extras``); the trainer turns them on.

Registered heads are listed by :func:`list_heads`; new ones plug in with :func:`register_head` (a thin wrapper
around :data:`HEADS`, a :class:`fvlm.registry.Registry`) and are then tested by ``tests/fvlm/test_zoo.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from fvlm.registry import Registry

__all__ = ["HEADS", "Head", "HeadContext", "register_head", "create_head", "list_heads", "data_extras_for", "extra_name",
           "parse_extra_name"]


@dataclass
class HeadContext:
    """What the towers computed for one batch (B samples, A anatomies, N tokens, W vision width, L text
    length, H text width, D embedding dim). Heads read it; they must not modify it in place."""

    image: Tensor
    """(B, C, Z, Y, X) the input crops."""
    anatomy: Tensor
    """(B, Z, Y, X) anatomy labels 0..A."""
    features: list[Tensor]
    """K x (B, N, W) normalised tokens of the pooled depths (``VisionConfig.output_layers``)."""
    tokens: Tensor
    """(B, N, W) normalised tokens of the last block."""
    grid: tuple[int, int, int]
    """Token grid (gz, gy, gx), N = gz * gy * gx."""
    touch: Tensor
    """(B, A, N) bool: token n touches anatomy a."""
    pooled: Tensor
    """(B, A, W) anatomy pooling's output before the per-anatomy projection (zero rows where masked)."""
    image_emb: Tensor
    """(B, A, D) L2-normalised anatomy image embeddings (masked rows zero)."""
    anatomy_mask: Tensor
    """(B, A) bool: anatomy present and not cut."""
    input_ids: Tensor | None
    """(B, A, L) anatomy text tokens; None in a text-free forward (every head has ``reads_text = False``)."""
    attention_mask: Tensor | None
    """(B, A, L) their attention mask; None with ``input_ids``."""
    text_hidden: Tensor | None
    """(B, A, L, H) the text encoder's last hidden states of the anatomy texts; None in a text-free forward."""
    text_emb: Tensor | None
    """(B, A, D) L2-normalised anatomy text embeddings; None in a text-free forward."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Room for heads run earlier to leave tensors for later ones (in ``ModelConfig.heads`` order)."""


class Head(nn.Module):
    """Base class of a model head; see the module docstring."""

    #: batch fields (beyond the model's own inputs) ``forward`` reads when present
    batch_keys: tuple[str, ...] = ()
    #: dataset extras (``pipelines.train.extras``) that produce those fields in training
    data_extras: tuple[str, ...] = ()
    #: whether ``forward`` reads the text side of the context (tokens, hidden states, text embeddings). A model
    #: whose heads all say False can run without its text tower (``FVLM.forward(..., input_ids=None)``), as the
    #: trainer does when no objective reads text either (``reads_text`` of the objectives).
    reads_text: bool = True

    @classmethod
    def extras_for(cls, options: dict[str, Any]) -> tuple[str, ...]:
        """The dataset extras a head built with ``options`` needs (default: ``data_extras``)."""
        return cls.data_extras

    def forward(self, model: nn.Module, ctx: HeadContext, **batch: Any) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError


#: name -> factory(config: ModelConfig, **options) -> Head; the built-in heads register on first lookup
HEADS: Registry[Callable[..., Head]] = Registry("head", where="model.heads", builtin=(
    "fvlm.model.heads.region",
    "fvlm.model.heads.uncertainty",
    "fvlm.model.heads.prompt",
    "fvlm.model.heads.entity",
    "fvlm.model.heads.reconstruct",
    "fvlm.model.heads.classifier",
))


def register_head(name: str, factory: Callable[..., Head] | None = None, *, overwrite: bool = False,
                  help: str | None = None):
    """Register ``factory(model_config, **options)`` (usually a :class:`Head` subclass) under ``name``;
    usable as a decorator. ``help``: one line (default: the first line of the factory's docstring)."""
    return HEADS.register(name, factory, overwrite=overwrite, help=help)


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return HEADS.names()


def create_head(name: str, config: Any, options: dict[str, Any] | None = None) -> Head:
    """Build head ``name`` for a model of ``config`` (a ModelConfig); unknown names and options are errors."""
    try:
        return HEADS.create(name, config, **dict(options or {}))
    except TypeError as e:
        raise ValueError(f"model.heads.{name}: {e}") from None


def data_extras_for(config: Any) -> tuple[str, ...]:
    """Dataset extras the heads of a ModelConfig need in training, without building the model."""
    out: list[str] = []
    for name, options in config.heads.items():
        factory = HEADS.get_obj(name)
        extras = factory.extras_for(options) if hasattr(factory, "extras_for") else getattr(factory, "data_extras", ())
        out.extend(extras)
    return tuple(dict.fromkeys(out))


def extra_name(base: str, **options: Any) -> str:
    """The name of dataset extra ``base`` drawn with ``options`` (recipe data a head passes on to the data
    pipeline, e.g. the masking rates of ``entity_mlm`` or the label threshold of ``label_text``):
    ``"base"`` without options, else ``"base?key=value&..."`` with the keys sorted and the values as JSON.
    ``pipelines.train.extras.get_extra`` builds the producer from it; :func:`parse_extra_name` inverts it."""
    import json

    if not options:
        return base
    return base + "?" + "&".join(f"{k}={json.dumps(options[k])}" for k in sorted(options))


def parse_extra_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"base?key=value&..."`` -> ``("base", {key: value})`` (values JSON); ValueError naming a bad part."""
    import json

    base, _, query = str(name).partition("?")
    options: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"dataset extra {name!r}: option {part!r} is not key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset extra {name!r}: option {key!r} has no JSON value ({value!r}: {e})") from None
    return base, options
