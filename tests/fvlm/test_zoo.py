"""The model zoo: every registered encoder, head and objective is tested the same way, by being registered
(timm ``tests/test_models.py``; issue 18 item 3).

The cases are parametrised over the registries (:mod:`fvlm.registry`), so a newly registered entry is tested
without a line here, unless it needs options to build (:data:`HEAD_OPTIONS`) or reads a batch field nobody
produced before (:data:`FIELDS`): then the test fails and says which table to extend.

- encoder pair (vision x text): a tiny model builds from the ``tiny`` preset with the pair named;
- model (tiny, each encoder pair) and head (tiny model with that one head): forward on a tiny batch, backward
  of every floating output, a finite gradient for every trainable parameter (:data:`NO_GRADIENT` lists the
  parameters that legitimately get none, with the reason), and a save/load round trip giving identical
  outputs;
- objective (tiny model with the heads it reads, ``needs_heads``): a finite loss and finite gradients on a
  tiny batch, reaching the model's parameters.

Entries registered by other test modules (probe heads, probe objectives) are left out: only those of the
``fvlm`` and ``pipelines`` packages are the zoo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from fvlm.losses.registry import OBJECTIVES
from fvlm.model import OUTPUT_KEYS, create_model, load_pretrained, save_pretrained
from fvlm.model.heads import HEADS
from fvlm.model.registry import TEXT_ENCODERS, VISION_ENCODERS
from fvlm.registry import Registry

B, L, L_REPORT, L_LABEL, K_DEFAULT = 2, 12, 16, 12, 4
#: (z, y, x) crop of the zoo's models: 2 x 2 x 2 tokens of the tiny preset's (8, 16, 16) patches
IMAGE_SIZE = [16, 32, 32]
VOCAB = 100


def _zoo(registry: Registry) -> list[str]:
    """The registered names whose object comes from the project's own packages (not from a test module)."""
    return [n for n in registry.names()
            if str(getattr(registry[n], "__module__", "")).split(".")[0] in ("fvlm", "pipelines")]


#: options a head needs to build at tiny size (a head building with none needs no entry)
HEAD_OPTIONS: dict[str, dict[str, Any]] = {
    "task_classifier": {"catalog": "fvlm54"},  # it has no default task list: the catalog of the fvlm15 anatomies
}

#: parameter-name substrings that legitimately get no gradient in a test, with the reason
NO_GRADIENT: dict[str, str] = {}


def _allowed_without_gradient(name: str) -> bool:
    return any(part in name for part in NO_GRADIENT)


# --------------------------------------------------------------------------------------------- the batch


def _image(g: torch.Generator, model) -> torch.Tensor:
    z, y, x = model.config.vision.image_size
    return torch.rand(B, model.config.vision.in_channels, z, y, x, generator=g)  # (B, C, Z, Y, X)


def _anatomy(g: torch.Generator, model) -> torch.Tensor:
    z, y, x = model.config.vision.image_size
    return torch.randint(0, model.num_anatomies + 1, (B, z, y, x), generator=g)  # (B, Z, Y, X): every anatomy


def _tokens(g: torch.Generator, a: int | None, length: int) -> torch.Tensor:
    shape = (B, length) if a is None else (B, a, length)
    ids = torch.randint(5, VOCAB, shape, generator=g)
    ids[..., 0] = 2  # [CLS]
    return ids


def _task_table(model) -> tuple[int, torch.Tensor | None]:
    """(K, the (A, K) task ids of the task_classifier head or None): the label columns of the batch."""
    head = model.heads["task_classifier"] if "task_classifier" in model.heads else None
    return (head.num_tasks, head.task_ids) if head is not None else (K_DEFAULT, None)


def _labels(g: torch.Generator, model) -> torch.Tensor:
    k, _ = _task_table(model)
    return (torch.rand(B, model.num_anatomies, k, generator=g) < 0.4).float()  # (B, A, K)


#: batch field -> maker(generator, model): every field a head reads (``batch_keys``) or an objective reads
FIELDS: dict[str, Callable[[torch.Generator, Any], torch.Tensor]] = {
    "image": _image,
    "anatomy": _anatomy,
    "input_ids": lambda g, m: _tokens(g, m.num_anatomies, L),  # (B, A, L)
    "attention_mask": lambda g, m: torch.ones(B, m.num_anatomies, L, dtype=torch.long),  # (B, A, L)
    "cut": lambda g, m: torch.zeros(B, m.num_anatomies, dtype=torch.bool),  # (B, A)
    "report_input_ids": lambda g, m: _tokens(g, None, L_REPORT),  # (B, L')
    "report_attention_mask": lambda g, m: torch.ones(B, L_REPORT, dtype=torch.long),  # (B, L')
    "case_id": lambda g, m: torch.arange(B),  # (B,)
    "text_id": lambda g, m: torch.randint(0, 1000, (B, m.num_anatomies), generator=g),  # (B, A)
    "normal": lambda g, m: torch.rand(B, m.num_anatomies, generator=g) < 0.3,  # (B, A)
    "anatomy_labels": _labels,  # (B, A, K)
    "has_report": lambda g, m: torch.ones(B, dtype=torch.bool),  # (B,)
    # dataset extras (pipelines.train.extras), as their producers stack them
    "image_view2": _image,
    "anatomy_view2": _anatomy,
    "cut_view2": lambda g, m: torch.zeros(B, m.num_anatomies, dtype=torch.bool),  # (B, A)
    "input_ids_view2": lambda g, m: _tokens(g, m.num_anatomies, L),  # (B, A, L)
    "attention_mask_view2": lambda g, m: torch.ones(B, m.num_anatomies, L, dtype=torch.long),  # (B, A, L)
    "label_input_ids": lambda g, m: _tokens(g, m.num_anatomies, L_LABEL),  # (B, A, L_lab)
    "label_attention_mask": lambda g, m: torch.ones(B, m.num_anatomies, L_LABEL, dtype=torch.long),
    "mlm_input_ids": lambda g, m: _tokens(g, m.num_anatomies, L),  # (B, A, L)
    "mlm_labels": lambda g, m: torch.where(torch.rand(B, m.num_anatomies, L, generator=g) < 0.3,
                                           _tokens(g, m.num_anatomies, L), -100),  # (B, A, L), -100 = not masked
    "mlm_weights": lambda g, m: torch.ones(B, m.num_anatomies, L),  # (B, A, L)
    "anatomy_label_known": lambda g, m: torch.ones(B, m.num_anatomies, _task_table(m)[0], dtype=torch.bool),
    "anatomy_task_ids": lambda g, m: (_task_table(m)[1] if _task_table(m)[1] is not None
                                      else torch.zeros(m.num_anatomies, K_DEFAULT, dtype=torch.long)
                                      ).expand(B, -1, -1).clone(),  # (B, A, K)
    "lesion": lambda g, m: (_anatomy(g, m) == 1).to(torch.uint8),  # (B, Z, Y, X)
}


def tiny_batch(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every field of :data:`FIELDS` for ``model`` (the model and the objectives ignore what they do not read);
    a field one of the model's heads reads and nobody makes is an error naming it."""
    missing = [k for k in model.batch_keys if k not in FIELDS]
    assert not missing, f"head batch field(s) {missing} have no maker: add them to FIELDS in {__file__}"
    g = torch.Generator().manual_seed(seed)
    return {k: make(g, model) for k, make in FIELDS.items()}


def tiny_model(heads: dict[str, dict[str, Any]] | None = None, **overrides: Any):
    torch.manual_seed(0)
    text = {"vocab_size": VOCAB, **overrides.pop("text", {})}
    vision = {"image_size": IMAGE_SIZE, **overrides.pop("vision", {})}
    return create_model("tiny", vision=vision, text=text, heads=heads or {}, **overrides)


def _outputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # heads that draw (masks, views) draw the same in every call
    return model(**batch)


def _scalar(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss reading every floating output through a fixed random projection (so no gradient cancels)."""
    g = torch.Generator().manual_seed(2)
    total = torch.zeros(())
    for v in out.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad:
            total = total + (v.float() * torch.randn(v.shape, generator=g)).sum()
    return total


def check_gradients(model, what: str) -> None:
    """Every trainable parameter has a finite gradient, except those :data:`NO_GRADIENT` allows."""
    none = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
            and not _allowed_without_gradient(n)]
    assert not none, f"{what}: no gradient reaches {none}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{what}: non-finite gradient in {bad}"


def check_round_trip(model, batch: dict[str, torch.Tensor], folder: Path, what: str) -> None:
    """save_pretrained then load_pretrained: the same outputs, bit for bit (eval mode)."""
    model.eval()
    with torch.no_grad():
        before = _outputs(model, batch)
    save_pretrained(model, None, folder)
    loaded, _ = load_pretrained(folder)
    assert type(loaded) is type(model) and loaded.config.heads.keys() == model.config.heads.keys()
    with torch.no_grad():
        after = _outputs(loaded, batch)
    assert after.keys() == before.keys(), f"{what}: outputs {list(after)} after loading, {list(before)} before"
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(after[k], v), f"{what}: output {k!r} differs after save/load"


# ------------------------------------------------------------------------------------------------ the zoo


def test_the_zoo_is_not_empty() -> None:
    """The parametrisation sees the built-ins (a broken registry would silently test nothing)."""
    assert {"vit3d"} <= set(_zoo(VISION_ENCODERS)) and {"bert"} <= set(_zoo(TEXT_ENCODERS))
    assert {"region", "uncertainty", "prompt_context", "entity_mlm", "masked_reconstruction",
            "task_classifier"} <= set(_zoo(HEADS))
    assert {"anatomy_contrastive", "clip_global", "supervised"} <= set(_zoo(OBJECTIVES))


ENCODER_PAIRS = [(v, t) for v in _zoo(VISION_ENCODERS) for t in _zoo(TEXT_ENCODERS)]


@pytest.mark.parametrize(("vision", "text"), ENCODER_PAIRS)
def test_model(vision: str, text: str, tmp_path: Path) -> None:
    model = tiny_model(vision={"name": vision}, text={"name": text})
    batch = tiny_batch(model)
    out = _outputs(model, batch)
    _scalar(out).backward()
    check_gradients(model, f"model {vision}+{text}")
    check_round_trip(model, batch, tmp_path / "model", f"model {vision}+{text}")


@pytest.mark.parametrize("name", _zoo(HEADS))
def test_head(name: str, tmp_path: Path) -> None:
    model = tiny_model({name: dict(HEAD_OPTIONS.get(name, {}))})
    batch = tiny_batch(model)
    out = _outputs(model, batch)
    added = [k for k in out if k not in OUTPUT_KEYS]
    assert added, f"head {name} added no output on a batch holding every field it reads"
    _scalar(out).backward()
    check_gradients(model, f"head {name}")
    check_round_trip(model, batch, tmp_path / "model", f"head {name}")


@pytest.mark.parametrize("name", _zoo(OBJECTIVES))
def test_objective(name: str) -> None:
    objective = OBJECTIVES.create(name)
    heads = {h: dict(HEAD_OPTIONS.get(h, {})) for h in getattr(objective, "needs_heads", ())}
    model = tiny_model(heads)
    batch = tiny_batch(model)
    out = _outputs(model, batch)
    terms = objective(**out, **batch)
    assert terms and set(terms) == set(objective.terms), f"objective {name}: terms {list(terms)}"
    loss = sum(terms.values())
    assert loss.dim() == 0 and torch.isfinite(loss), f"objective {name}: loss {loss}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, f"objective {name}: no gradient reaches the model"
    assert all(torch.isfinite(g).all() for g in grads), f"objective {name}: a non-finite gradient"
    assert any(bool(g.abs().sum() > 0) for g in grads), f"objective {name}: every gradient is zero"
