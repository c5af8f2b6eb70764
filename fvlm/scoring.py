"""Per-recipe zero-shot scoring: each recipe scores a task with the similarity it trained (issue 22).

:mod:`fvlm.zeroshot` builds the prompt bank (per task the positive and negative prompt texts and their pooled
text embeddings). A *scorer* turns that bank and a batch of images into per-task probabilities, always as
the softmax over the (negative, positive) pair of logits, positive side::

    p_t = softmax([l_neg, l_pos])[pos] = sigmoid(l_pos - l_neg)

What the logits are depends on what the recipe trained:

``pooled`` (fVLM, disease-aware, CLIP, unified, entity): ``l = s * <I_a, T>``, the cosine of the pooled
    anatomy embedding and the (template-averaged) prompt embedding times the model's logit scale ``s``;
    exactly :func:`fvlm.zeroshot.score_cases`.
``wasserstein`` (uncertainty): ``l = -(s c / 2) W2^2(N(I_a, diag e^{v_a}), N(P, diag sigma_P^2))``, the
    2-Wasserstein distance of ``uncertainty_contrastive`` (:func:`fvlm.losses.functional.w2_logits`) between
    the anatomy's image Gaussian (mean ``image_emb``, log-variances of the ``uncertainty`` head) and the
    prompt's Gaussian (mean the prompt embedding, log-variances the head's text map of the prompt's [CLS]
    state), with the objective's ``distance_scale`` ``c``. Several templates per side are merged into their
    W2 barycentre (for diagonal Gaussians: the mean of the means, L2-renormalised as every mean the objective
    sees, and the mean of the standard deviations). With equal variances this ranks as ``pooled`` does
    (``W2^2 = 2 - 2 cos``); with different variances it ranks as training does: of two images with the same
    mean, the one whose variance is closer to the positive prompt's scores higher.
``region`` (region): ``l = s_r * S(prompt, image) + w * s * <I_a, T>``, the late-interaction similarity of
    ``region_contrastive`` (:func:`fvlm.losses.functional.late_interaction`: the prompt's tokens attend to
    the anatomy's kept top-k regions through the head's learned query/key/value maps; ``s_r`` the head's own
    logit scale), averaged over the side's templates, plus ``w`` (``pooled_weight``, a recipe option of
    ``region_contrastive``: ``zeroshot_pooled_weight``, default 0) times the pooled logits.

Whole-study tasks (no anatomy) have neither an anatomy Gaussian nor anatomy regions: every scorer scores them
from the global image embedding as ``pooled`` does. A task whose anatomy is masked (or keeps no region) is
NaN, never 0.

Which scorer a model uses is declared where the method lives, never found from names: an objective's
``zeroshot_scorer()`` returns a :class:`ScorerSpec` (the recipe's objectives, ``fvlm.losses``), and a model
head's ``zeroshot_scorer()`` does the same for a bare export without its recipe. :func:`scorer_spec` picks:
the one non-pooled spec if any (two different ones are an error), else ``pooled`` with the objectives'
reasons (the entity objectives, for instance, say why they are scored through the pooled embedding).
``fvlm evaluate`` and ``fvlm predict`` both go through :func:`create_scorer` and a scorer's
:meth:`Scorer.prepare` / :meth:`Scorer.encode` / :meth:`Scorer.score`.

Registry: :func:`register_scorer`, :func:`create_scorer`, :func:`list_scorers` (thin wrappers around
:data:`SCORERS`, a :class:`fvlm.registry.Registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fvlm.registry import Registry

__all__ = ["SCORERS", "ScorerSpec", "Scorer", "PooledScorer", "WassersteinScorer", "RegionScorer", "register_scorer",
           "create_scorer", "list_scorers", "scorer_spec", "pair_probability"]


@dataclass(frozen=True)
class ScorerSpec:
    """A zero-shot scorer by name (:func:`create_scorer`) with its options and why it is the one."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def _scalar(x: Any) -> float:
    """A (possibly learnable) scalar tensor as a float, without its graph."""
    return float(torch.as_tensor(x).detach())


def pair_probability(l_neg: Tensor, l_pos: Tensor) -> Tensor:
    """``softmax([l_neg, l_pos])[pos]`` elementwise (any shape)."""
    return torch.softmax(torch.stack([l_neg, l_pos], dim=-1), dim=-1)[..., 1]


# ------------------------------------------------------------------------------------------------ registry

#: name -> scorer class (or factory); ``Scorer`` subclasses register with :func:`register_scorer`
SCORERS: Registry[Callable[..., "Scorer"]] = Registry("zero-shot scorer")


def register_scorer(name: str, factory: Callable[..., "Scorer"] | None = None, *, overwrite: bool = False,
                    help: str | None = None):
    """Register a scorer class (or factory) under ``name``; usable as a decorator."""
    return SCORERS.register(name, factory, overwrite=overwrite, help=help)


def list_scorers() -> list[str]:
    """Names of the registered zero-shot scorers, sorted."""
    return SCORERS.names()


def create_scorer(name: str, **options: Any) -> "Scorer":
    """Build the scorer ``name`` with ``options``; unknown names and options are errors naming the known ones."""
    return SCORERS.create(name, **options)


def scorer_spec(objectives: Sequence[Any] = (), model: Any = None) -> ScorerSpec:
    """The scorer a model is evaluated with (module docstring): from the recipe's built ``objectives`` when
    given, else from the ``model``'s heads (a bare export). ValueError when two methods declare different
    non-pooled scorers."""
    owners = list(objectives)
    source = "objective"
    if not owners and model is not None:
        owners = list(getattr(model, "heads", {}).values())
        source = "model head"
    specs = [s for s in (o.zeroshot_scorer() for o in owners if hasattr(o, "zeroshot_scorer")) if s is not None]
    special = [s for s in specs if s.name != "pooled"]
    if len({s.name for s in special}) > 1:
        raise ValueError("the recipe declares more than one zero-shot scorer ("
                         + "; ".join(f"{s.name}: {s.reason}" for s in special) + "); score with one of them")
    if special:
        return special[0]
    reasons = [s.reason for s in specs if s.reason]
    why = "; ".join(dict.fromkeys(reasons)) or f"no {source} declares another scorer"
    return ScorerSpec("pooled", {}, why)


# ------------------------------------------------------------------------------------------------ scorers


class Scorer:
    """Base class: per batch of images, (B, T) probabilities of a prompt bank's tasks (module docstring).

    ``prepare(model, tokenizer, bank)`` encodes what the scorer needs of the prompts (once per bank);
    ``encode(model, image, anatomy, cut)`` what it needs of a batch of images (B, ...) (also for windows:
    one row per window); ``score(model, features, prompts)`` the (B, T) float64 probabilities.
    """

    name = "base"
    #: what the scores are, for ``metrics.json`` and the prediction document
    description = ""

    def prepare(self, model: Any, tokenizer: Any, bank: Any) -> dict[str, Any]:
        return {"bank": bank}

    @torch.no_grad()
    def encode(self, model: Any, image: Tensor, anatomy: Tensor, cut: Tensor | None = None) -> dict[str, Tensor]:
        enc = model.encode_image(image, anatomy, cut)
        return {"image_emb": enc["image_emb"].float(), "anatomy_mask": enc["anatomy_mask"].bool(),
                "global_image_emb": enc["global_image_emb"].float()}

    def score(self, model: Any, features: dict[str, Tensor], prompts: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError

    @torch.no_grad()
    def score_images(self, model: Any, prompts: dict[str, Any], image: Tensor, anatomy: Tensor,
                     cut: Tensor | None = None) -> np.ndarray:
        """:meth:`encode` then :meth:`score`: (B, T)."""
        return self.score(model, self.encode(model, image, anatomy, cut), prompts)

    def describe(self) -> str:
        return self.description

    # --------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _pooled(model: Any, features: dict[str, Tensor], bank: Any) -> np.ndarray:
        from fvlm.zeroshot import score_cases

        return score_cases(features["image_emb"], features["anatomy_mask"], bank, _scalar(model.logit_scale()),
                           features.get("global_image_emb"))

    @staticmethod
    def _catalog_prompts(bank: Any, who: str) -> None:
        if getattr(bank, "templates", None) == "learned":
            raise ValueError(f"the {who} zero-shot scorer reads the prompts through the text tower; learned prompt "
                             "context (--prompts learned) belongs to the prompt_context head: use catalog prompts")


@register_scorer("pooled")
class PooledScorer(Scorer):
    """Cosine of the pooled anatomy embedding and the prompt embedding times the logit scale."""

    name = "pooled"
    description = ("softmax over (negative, positive) prompt similarity of the pooled anatomy embedding times the "
                   "logit scale; positive side")

    def __init__(self) -> None:
        pass

    def score(self, model: Any, features: dict[str, Tensor], prompts: dict[str, Any]) -> np.ndarray:
        return self._pooled(model, features, prompts["bank"])


def _head(model: Any, name: str, scorer: str) -> Any:
    heads = getattr(model, "heads", None)
    if heads is None or name not in heads:
        have = ", ".join(heads.keys()) if heads is not None and len(heads) else "none"
        raise ValueError(f"the {scorer} zero-shot scorer needs the model's {name!r} head (its heads: {have}); "
                         f"score this model with the pooled scorer")
    return heads[name]


def _encode_texts(model: Any, tokenizer: Any, texts: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Prompt texts as training tokenises anatomy texts: (S, D) embeddings, (S, L, H) hidden states, ids and mask
    (S, L)."""
    length = int(getattr(model.config.text, "max_length", 64) or 64)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_attention_mask=True,
                    return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    emb, hidden = model.encode_text(ids, mask, return_hidden=True)
    return emb.float(), hidden, ids, mask


@register_scorer("wasserstein")
class WassersteinScorer(Scorer):
    """``-(s c / 2) W2^2`` between the anatomy's image Gaussian and the prompts' Gaussians (module docstring).

    Args:
        distance_scale: ``c`` of ``uncertainty_contrastive`` (the recipe's option; 1 for a bare export, which
            changes the probabilities' sharpness, never their ranking).
    """

    name = "wasserstein"

    def __init__(self, distance_scale: float = 1.0) -> None:
        if isinstance(distance_scale, bool) or not isinstance(distance_scale, (int, float)) or distance_scale <= 0:
            raise ValueError(f"wasserstein scorer: distance_scale must be a positive number, got {distance_scale!r}")
        self.distance_scale = float(distance_scale)

    def describe(self) -> str:
        return (f"softmax over (negative, positive) of -(s c / 2) W2^2 between the anatomy's image Gaussian (mean "
                f"image_emb, variances of the uncertainty head) and the prompts' Gaussians (W2 barycentre of the "
                f"templates), c = {self.distance_scale:g}, as uncertainty_contrastive trains; whole-study tasks: "
                f"pooled cosine of the global embedding; positive side")

    @torch.no_grad()
    def prepare(self, model: Any, tokenizer: Any, bank: Any) -> dict[str, Any]:
        head = _head(model, "uncertainty", "wasserstein")
        self._catalog_prompts(bank, "wasserstein")
        texts = [s for pos, neg in bank.prompts for s in (*pos, *neg)]
        emb, hidden, _, _ = _encode_texts(model, tokenizer, texts)
        a = int(model.config.num_anatomies)
        cls = hidden[:, 0]  # (S, H) [CLS] states, as the head reads anatomy texts
        logvar = head.text_logvar(cls.unsqueeze(1).expand(-1, a, -1)).float()  # (S, A, D)
        rows = {"pos_mu": [], "pos_lv": [], "neg_mu": [], "neg_lv": []}
        k = 0
        for (pos, neg), idx in zip(bank.prompts, bank.anatomy_index):
            row = max(int(idx), 0)  # whole-study tasks: unused (scored pooled)
            for side, texts_ in (("pos", pos), ("neg", neg)):
                mu, lv = emb[k:k + len(texts_)], logvar[k:k + len(texts_), row]  # (P, D) each
                k += len(texts_)
                rows[f"{side}_mu"].append(F.normalize(mu.mean(0), dim=-1))  # barycentre mean, unit as in training
                rows[f"{side}_lv"].append(2.0 * torch.exp(0.5 * lv).mean(0).log())  # barycentre sigma = mean sigma
        return {"bank": bank, **{key: torch.stack(v) for key, v in rows.items()}}  # (T, D) each

    @torch.no_grad()
    def encode(self, model: Any, image: Tensor, anatomy: Tensor, cut: Tensor | None = None) -> dict[str, Tensor]:
        head = _head(model, "uncertainty", "wasserstein")
        enc = model.encode_image(image, anatomy, cut, return_context=True)
        return {"image_emb": enc["image_emb"].float(), "anatomy_mask": enc["anatomy_mask"].bool(),
                "global_image_emb": enc["global_image_emb"].float(),
                "image_logvar": head.image_logvar(enc["pooled"]).float()}  # (B, A, D)

    def score(self, model: Any, features: dict[str, Tensor], prompts: dict[str, Any]) -> np.ndarray:
        bank = prompts["bank"]
        out = self._pooled(model, features, bank)  # whole-study tasks (and the NaN layout)
        idx = torch.tensor(bank.anatomy_index, dtype=torch.long)
        tasks = torch.nonzero(idx >= 0).flatten()
        if not len(tasks):
            return out
        scale = 0.5 * self.distance_scale * _scalar(model.logit_scale())  # a = s c / 2
        logits = wasserstein_logits(features["image_emb"], features["image_logvar"], idx[tasks],
                                    {k: v[tasks] for k, v in prompts.items() if k != "bank"}, scale)
        prob = pair_probability(logits["neg"], logits["pos"])  # (B, T')
        valid = features["anatomy_mask"][:, idx[tasks]].cpu()
        out[:, tasks.numpy()] = torch.where(valid, prob.cpu().double(), float("nan")).numpy()
        return out


def wasserstein_logits(image_mu: Tensor, image_logvar: Tensor, anatomy_index: Tensor, prompts: dict[str, Tensor],
                       scale: float) -> dict[str, Tensor]:
    """``{"pos": (B, T), "neg": (B, T)}`` logits ``-scale * W2^2`` of each case's anatomy Gaussian (``image_mu``,
    ``image_logvar`` (B, A, D)) against each task's prompt Gaussians (``prompts``: ``pos_mu``, ``pos_lv``,
    ``neg_mu``, ``neg_lv`` (T, D)); ``anatomy_index`` (T,) each task's anatomy row (>= 0)."""
    from fvlm.losses.functional import w2_logits

    mu = image_mu[:, anatomy_index].transpose(0, 1)  # (T, B, D)
    lv = image_logvar[:, anatomy_index].transpose(0, 1)  # (T, B, D)
    out = {}
    for side in ("pos", "neg"):
        p_mu = prompts[f"{side}_mu"].to(mu.device, mu.dtype).unsqueeze(1)  # (T, 1, D)
        p_lv = prompts[f"{side}_lv"].to(mu.device, mu.dtype).unsqueeze(1)  # (T, 1, D)
        out[side] = w2_logits(mu, lv, p_mu, p_lv, scale)[..., 0].T  # (T, B, 1) -> (B, T)
    return out


@register_scorer("region")
class RegionScorer(Scorer):
    """Region similarity of the prompts' tokens and the kept regions (+ ``pooled_weight`` x pooled logits).

    Args:
        pooled_weight: ``w`` of the module docstring: 0 scores the region similarity alone, 1 adds the pooled
            logits in full (a product of the two pair probabilities' odds).
    """

    name = "region"

    def __init__(self, pooled_weight: float = 0.0) -> None:
        if isinstance(pooled_weight, bool) or not isinstance(pooled_weight, (int, float)) or pooled_weight < 0:
            raise ValueError(f"region scorer: pooled_weight must be a number >= 0, got {pooled_weight!r}")
        self.pooled_weight = float(pooled_weight)

    def describe(self) -> str:
        extra = f" + {self.pooled_weight:g} x the pooled logits" if self.pooled_weight else ""
        return ("softmax over (negative, positive) of the region head's logit scale times the late-interaction "
                f"similarity of the prompt's tokens and the anatomy's kept top-k regions, as region_contrastive "
                f"trains{extra}; whole-study tasks: pooled cosine of the global embedding; positive side")

    @torch.no_grad()
    def prepare(self, model: Any, tokenizer: Any, bank: Any) -> dict[str, Any]:
        head = _head(model, "region", "region")
        self._catalog_prompts(bank, "region")
        texts = [s for pos, neg in bank.prompts for s in (*pos, *neg)]
        _, hidden, _, mask = _encode_texts(model, tokenizer, texts)
        text, query = head.text_tokens(hidden)  # (S, L, D) each
        spans, k = [], 0
        for pos, neg in bank.prompts:
            spans.append(((k, k + len(pos)), (k + len(pos), k + len(pos) + len(neg))))
            k += len(pos) + len(neg)
        return {"bank": bank, "text": text.float(), "query": query.float(), "mask": mask.bool(), "spans": spans}

    @torch.no_grad()
    def encode(self, model: Any, image: Tensor, anatomy: Tensor, cut: Tensor | None = None) -> dict[str, Tensor]:
        head = _head(model, "region", "region")
        enc = model.encode_image(image, anatomy, cut, return_context=True)
        touch = enc["touch"] & enc["anatomy_mask"].unsqueeze(-1)  # (B, A, N): as in training
        reg = head.image_regions(enc["features"][head.layer], touch)
        return {"image_emb": enc["image_emb"].float(), "anatomy_mask": enc["anatomy_mask"].bool(),
                "global_image_emb": enc["global_image_emb"].float(), "regions": reg["regions"].float(),
                "keys": reg["keys"].float(), "values": reg["values"].float(), "keep": reg["keep"].bool()}

    def score(self, model: Any, features: dict[str, Tensor], prompts: dict[str, Any]) -> np.ndarray:
        from fvlm.losses.functional import late_interaction

        bank = prompts["bank"]
        head = _head(model, "region", "region")
        out = self._pooled(model, features, bank)  # whole-study tasks, and the pooled part below
        s_r = _scalar(head.logit_scale())
        s = _scalar(model.logit_scale())
        tau = head.temperature.float()
        for t, a in enumerate(bank.anatomy_index):
            if a < 0:
                continue
            sl = slice(a, a + 1)
            logits = []
            for (lo, hi), proto in zip(prompts["spans"][t], (bank.positive[t], bank.negative[t])):
                sim, _ = late_interaction(
                    prompts["text"][lo:hi].unsqueeze(1), prompts["mask"][lo:hi].unsqueeze(1),
                    features["regions"][:, sl], features["keep"][:, sl], tau,
                    queries=prompts["query"][lo:hi].unsqueeze(1), keys=features["keys"][:, sl],
                    values=features["values"][:, sl])  # (1, B, P)
                logit = s_r * sim[0].mean(-1)  # (B,) mean over the side's templates
                if self.pooled_weight:
                    cos = features["image_emb"][:, a] @ proto.float().to(features["image_emb"].device)  # (B,)
                    logit = logit + self.pooled_weight * s * cos
                logits.append(logit)
            prob = pair_probability(logits[1], logits[0])  # (B,)
            valid = features["anatomy_mask"][:, a] & features["keep"][:, a].any(-1)
            out[:, t] = torch.where(valid, prob.double(), float("nan")).cpu().numpy()
        return out
