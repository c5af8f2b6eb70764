"""Which image embedding ``fvlm evaluate`` reads each task from: the anatomy's own (``anatomy``) or the whole
scan's (``global``).

A whole-scan recipe (``clip``: objective ``clip_global``, CT-CLIP) trains only ``global_image_emb`` against the
whole report; its per-anatomy embeddings never meet a loss, so reading anatomy tasks from them measures an
untrained pooling head, not the recipe. CT-CLIP reads every task from the whole-scan embedding; so does the
``global`` readout: every task is scored from ``global_image_emb`` against the task's prompts, and stays NaN
where the anatomy is absent or masked, so that both readouts score the same cases.

``auto`` (default) picks ``global`` when the run's recipe (``RUN/config.yaml``) trains the whole-scan embedding
and no per-anatomy image output: an objective's inputs are the keyword arguments of its ``forward`` (the
model's output keys, ``fvlm.losses.registry``); it reads the whole scan when they include
``global_image_emb`` and the anatomies when they include any of :data:`ANATOMY_INPUTS`. Objectives that read
neither (auxiliary heads: ``entity_mlm``, ``guided_reconstruction``), and terms weighted 0, do not decide. A
bare model export (no recipe beside it) reads the anatomies.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["READOUTS", "ANATOMY_INPUTS", "GLOBAL_INPUTS", "objective_inputs", "recipe_readout", "resolve_readout",
           "global_rows"]

READOUTS = ("auto", "anatomy", "global")
#: model outputs per anatomy: an objective that reads one of them trains the per-anatomy embeddings
ANATOMY_INPUTS = frozenset({"image_emb", "anatomy_mask", "region_tokens"})
#: the whole-scan image embedding
GLOBAL_INPUTS = frozenset({"global_image_emb"})


def objective_inputs(name: str, options: dict[str, Any] | None = None) -> set[str]:
    """The keyword inputs of the registered objective ``name``'s ``forward`` (``**batch`` excluded)."""
    from fvlm.losses import create_objective

    forward = create_objective(name, **(options or {})).forward
    return {p.name for p in inspect.signature(forward).parameters.values()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


def recipe_readout(objectives: Sequence[Any]) -> tuple[str, str]:
    """(readout, why) of a recipe's ``objectives`` (``ObjectiveSpec``: ``name``, ``options``)."""
    whole, anatomy = [], []
    for spec in objectives:
        if not getattr(spec, "weight", 1.0):
            continue  # a term weighted 0 trains nothing
        inputs = objective_inputs(spec.name, getattr(spec, "options", None))
        if inputs & ANATOMY_INPUTS:
            anatomy.append(spec.name)
        elif inputs & GLOBAL_INPUTS:
            whole.append(spec.name)
    if whole and not anatomy:
        return "global", f"whole-scan objective(s) only ({', '.join(whole)})"
    if anatomy:
        return "anatomy", f"per-anatomy objective(s) ({', '.join(anatomy)})"
    return "anatomy", "no objective reads an image embedding"


def resolve_readout(checkpoint: Path, readout: str = "auto") -> dict[str, str]:
    """``{"readout": "anatomy" | "global", "source": why}``: ``readout`` itself unless ``auto``, else from the
    run's recipe (``RUN/config.yaml``), else ``anatomy`` (a bare export)."""
    if readout not in READOUTS:
        raise ValueError(f"--readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    if readout != "auto":
        return {"readout": readout, "source": "command line"}
    run_cfg = Path(checkpoint) / "config.yaml"
    if not run_cfg.is_file():
        return {"readout": "anatomy", "source": "auto: no run recipe beside the export (per-anatomy default)"}
    from pipelines.config.recipe import load_recipe

    chosen, why = recipe_readout(load_recipe(run_cfg).objectives)
    return {"readout": chosen, "source": f"auto: recipe {run_cfg.name}: {why}"}


def global_rows(image_emb: torch.Tensor, global_image_emb: torch.Tensor) -> torch.Tensor:
    """(B, A, D) with every anatomy row the case's global embedding (B, D): the global readout's ``image_emb``
    for :func:`fvlm.zeroshot.score_cases` (the anatomy mask is kept, so masked anatomies stay NaN)."""
    return global_image_emb.to(image_emb.dtype).unsqueeze(1).expand_as(image_emb)  # (B, A, D)
