"""Supervised-ceiling scoring (issue 15 item 5): the ``task_classifier`` head's logits laid out like the
zero-shot scores of :mod:`fvlm.zeroshot` (cases x tasks, NaN where there is no score), so ``fvlm evaluate``
scores a model trained with the ``supervised`` recipe through the same metrics.

A library: a model and tensors in, arrays out. No file I/O, no training code.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from fvlm.model.heads.classifier import NAME

__all__ = ["classifier_head", "supervised_scores"]


def classifier_head(model: Any) -> Any:
    """The model's ``task_classifier`` head; ValueError when it has none."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    heads = getattr(model, "heads", None)
    if heads is None or NAME not in heads:
        have = ", ".join(heads.keys()) if heads is not None and len(heads) else "none"
        raise ValueError(f"supervised scores need a model trained with the {NAME} head (recipe `supervised`); this "
                         f"model's heads: {have}. Score it zero-shot instead")
    return heads[NAME]


@torch.no_grad()
def supervised_scores(model: Any, image: Tensor, anatomy: Tensor, cut: Tensor | None,
                      task_names: Sequence[str], probability: bool = False) -> np.ndarray:
    """(B, T) float64: the ``task_classifier`` logit of each task of ``task_names`` for each case.

    ``image`` (B, C, Z, Y, X) in [0, 1], ``anatomy`` (B, Z, Y, X) labels 0..A and ``cut`` (B, A) bool or None,
    as for ``FVLM.encode_image``. Column t holds ``z[b, a_t, k_t]``, the logit of task t at its anatomy row
    and column in the head (``TaskClassifier.index``); NaN where that anatomy is masked in the case (absent, or
    cut), and for a task the head has no logit for (a whole-study task, a task of another catalog). Logits rank
    the cases as well as probabilities do (AUC); ``probability`` gives ``sigmoid(z)`` instead. The model's
    training / eval mode is left as it is (call ``model.eval()`` first for dropout-free scores).

    Raises ValueError when the model has no ``task_classifier`` head.
    """
    head = classifier_head(model)
    net = getattr(model, "module", model)
    names = [str(t) for t in task_names]
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    enc = net.encode_image(image.to(device=device, dtype=dtype), anatomy.to(device),
                           None if cut is None else cut.to(device), return_context=True)
    logits = head.logits(enc["pooled"]).float()  # (B, A, K)
    mask = enc["anatomy_mask"].bool()  # (B, A)
    b = logits.shape[0]
    out = np.full((b, len(names)), np.nan, dtype=np.float64)
    where = [(t, head.index(n)) for t, n in enumerate(names)]
    where = [(t, ak) for t, ak in where if ak is not None]
    if not where:
        return out
    cols = torch.tensor([t for t, _ in where], dtype=torch.long)
    rows = torch.tensor([ak[0] for _, ak in where], dtype=torch.long, device=logits.device)
    ks = torch.tensor([ak[1] for _, ak in where], dtype=torch.long, device=logits.device)
    z = logits[:, rows, ks]  # (B, T')
    if probability:
        z = torch.sigmoid(z)
    z = torch.where(mask[:, rows], z, torch.full_like(z, float("nan")))  # (B, T')
    out[:, cols.numpy()] = z.double().cpu().numpy()
    return out
