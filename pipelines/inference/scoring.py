"""The zero-shot scorer of a checkpoint and the loops that run it (``fvlm evaluate`` and ``fvlm predict``).

Which scorer (``fvlm.scoring``): declared by the recipe's objectives (``RUN/config.yaml``: each objective
weighted above 0 is built through the objective registry and asked ``zeroshot_scorer()``), else, for a bare
export, by the model's heads; ``fvlm.scoring.scorer_spec`` picks. The base recipes score ``pooled`` (the cosine
of the pooled anatomy embedding, the same numbers as before); ``fvlm-uncertainty`` scores with its
2-Wasserstein distance, ``fvlm-region`` with its region similarity (``zeroshot_pooled_weight`` of
``region_contrastive`` adds the pooled logits).

Loops for a non-pooled scorer (the pooled one keeps ``pipelines.evaluate.run``'s own loops, which call the
same ``fvlm.zeroshot.score_cases``):

* :func:`scorer_dataset_scores`: the deterministic view of every case (central crop or resize);
* :func:`scorer_window_scores`: the windows around each anatomy (``pipelines.inference.windows``): per window
  the scorer's (W, T) scores (NaN where the anatomy does not count), a task's case score the mean over the
  windows where it has one, whole-study tasks the pooled score of the window-averaged global embedding, as
  for the pooled scorer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["resolve_scorer", "scorer_dataset_scores", "scorer_window_scores", "scorer_info", "case_confidences"]


def _recipe_path(checkpoint: Path) -> Path | None:
    """RUN/config.yaml for a run folder (or its ``model`` export), else None."""
    checkpoint = Path(checkpoint)
    for folder in (checkpoint, checkpoint.parent if checkpoint.name == "model" else None):
        if folder is not None and (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def resolve_scorer(checkpoint: Path, model: Any) -> tuple[Any, Any, str]:
    """(scorer, its ``ScorerSpec``, where it was declared) for the model at ``checkpoint``."""
    from fvlm.losses import create_objective
    from fvlm.scoring import create_scorer, scorer_spec

    path = _recipe_path(Path(checkpoint))
    objectives: list[Any] = []
    if path is not None:
        from pipelines.config.recipe import load_recipe

        objectives = [create_objective(s.name, **(s.options or {})) for s in load_recipe(path).objectives
                      if getattr(s, "weight", 1.0)]
        source = f"recipe {path.parent.name}/{path.name}"
    else:
        source = "the model's heads (no run recipe beside the export)"
    spec = scorer_spec(objectives, model)
    return create_scorer(spec.name, **spec.options), spec, source


def scorer_info(scorer: Any, spec: Any, source: str) -> dict[str, Any]:
    """What ``metrics.json`` and the prediction document say about the scoring."""
    return {"name": spec.name, "options": dict(spec.options), "declared_by": source, "reason": spec.reason,
            "score": scorer.describe()}


@torch.no_grad()
def scorer_dataset_scores(model: Any, scorer: Any, prompts: dict[str, Any], dataset: Any,
                          batch_size: int = 4) -> np.ndarray:
    """(N, T) scores of ``dataset``'s deterministic view (``CaseDataset(train=False)``) with ``scorer``."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        out.append(scorer.score_images(model, prompts, torch.stack([it["image"] for it in items]).to(device),
                                       torch.stack([it["anatomy"] for it in items]).to(device),
                                       torch.stack([it["cut"] for it in items]).to(device)))
    return np.concatenate(out) if out else np.zeros((0, len(prompts["bank"])))


@torch.no_grad()
def scorer_window_scores(model: Any, scorer: Any, prompts: dict[str, Any], dataset: Any, size_zyx,
                         min_inside: float = 0.5, batch_size: int = 4) -> tuple[np.ndarray, list[int]]:
    """(N, T) scores from the windows around each anatomy with ``scorer`` (module docstring), and the number
    of windows per case."""
    from fvlm.zeroshot import score_cases
    from pipelines.inference.windows import combine_window_scores, dataset_window_scores, window_global

    bank = prompts["bank"]
    device = next(model.parameters()).device
    scale = float(model.logit_scale().detach())

    def score_case(cw: Any) -> np.ndarray:  # (T,)
        per_w, glob_rows = [], []
        for s in range(0, cw.image.shape[0], batch_size):
            feats = scorer.encode(model, cw.image[s:s + batch_size].to(device), cw.anatomy[s:s + batch_size].to(device),
                                  cw.cut[s:s + batch_size].to(device))
            per_w.append(scorer.score(model, feats, prompts))  # (w, T)
            glob_rows.append(feats["global_image_emb"])
        g = window_global(torch.cat(glob_rows))  # (1, D)
        a = cw.cut.shape[1]
        empty = torch.zeros(1, a, g.shape[-1], device=g.device)
        glob = score_cases(empty, torch.zeros(1, a, dtype=torch.bool, device=g.device), bank, scale, g)[0]  # (T,)
        return combine_window_scores(np.concatenate(per_w), bank, glob)

    return dataset_window_scores(dataset, size_zyx, min_inside, len(bank), score_case)


@torch.no_grad()
def case_confidences(model: Any, dataset: Any, batch_size: int = 4) -> np.ndarray:
    """(N, A) the ``uncertainty`` head's confidence ``1 / (1 + vbar / v_0)`` (what ``fvlm predict`` reports) of
    every case's anatomies on ``dataset``'s deterministic view; NaN where the anatomy is masked. With the
    evaluation's scores and labels it feeds ``fvlm.calibration.task_confidence_check``: is the confidence
    higher where the model scores right? ValueError for a model without the head."""
    heads = getattr(model, "heads", None)
    if heads is None or "uncertainty" not in heads:
        raise ValueError("confidences need the model's uncertainty head (recipe fvlm-uncertainty)")
    head = heads["uncertainty"]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        enc = model.encode_image(torch.stack([it["image"] for it in items]).to(device),
                                 torch.stack([it["anatomy"] for it in items]).to(device),
                                 torch.stack([it["cut"] for it in items]).to(device), return_context=True)
        conf, _ = head.confidence(head.image_logvar(enc["pooled"]))  # (b, A)
        out.append(torch.where(enc["anatomy_mask"], conf, float("nan")).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, int(model.config.num_anatomies)))
