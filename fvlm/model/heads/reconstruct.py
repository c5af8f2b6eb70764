"""Head ``masked_reconstruction``: masked image modelling inside the anatomies, focused where the text points.

After SimMIM (Xie et al., CVPR 2022: mask tokens, encode with a learnable mask token in their place, predict
the raw voxels with a light head) and ECAMP's guided reconstruction (docs/methods.md#origins), per anatomy crop.

Notation: B samples, A anatomies, N vision tokens of width W, P = C * pz * py * px voxels of one patch.

1. Which tokens are masked (:func:`draw_token_mask`). ``inside_ban`` = token n touches anatomy a and a is
   present (``ctx.touch`` and ``ctx.anatomy_mask``). Each anatomy's tokens fall in two pools, the guided
   ones (``g_ban > 0``, step 3) and the rest; in each pool the ``ceil(mask_ratio * |pool|)`` tokens of
   lowest ``u_bn ~ U(0, 1)`` (one draw per token, shared by the anatomies) are masked, and a token masked
   for one anatomy is masked for all: at least ``mask_ratio`` of every present anatomy's tokens, and of its
   guided tokens, are masked (so a guided anatomy always has a masked guided token).
2. Encode and predict. The vision tower runs again on the same crop with the masked tokens' patch
   embeddings replaced by a learned mask token (``ViT3D.forward(token_mask=..., mask_token=...)``), then
   ``decoder_depth`` transformer blocks of the vision width (0: none), a LayerNorm and the prediction head::

       yhat_bn = W_p x_bn + b_p                          (P,)  voxels of patch n at the input's resolution

   The "super-resolution" is from the token grid to the voxel grid: one token, a W-vector standing for a
   pz x py x px patch (16 x 16 x 32 in the base model, 8 x 16 x 16 in tiny), is decoded into every voxel
   of its patch. The target is real image data: the crop the model was given (``ctx.image``), patchified.
   A finer target than the input is not offered: ``fvlm preprocess`` resamples every case to the run's
   spacing and the training crop is read from that, so a 2x target would be an interpolation of the
   input, not information. ``norm_target`` normalises each target patch by its own mean and standard
   deviation (MAE's per-patch normalisation).
3. Where the loss looks. Per-anatomy guide weights ``g_ban >= 0`` (``guide``):

   ``region_weights``    the ``region`` head's selection weights ``ctx.extra["region_weights"]`` (B, A, N):
                         its top-k tokens per anatomy (that head must come earlier in ``model.heads``);
   ``region_attention``  the same head's text attention over its kept tokens (``ctx.extra``);
   ``text_attention``    the ``entity_mlm`` head's cross-attention of the masked report words over the
                         anatomy's tokens (``ctx.extra``; that head must come earlier in ``model.heads``);
                         an anatomy where it is all zero (no masked word) falls back to uniform;
   ``lesion``            a lesion map in the batch (field ``lesion`` (B, Z, Y, X), nonzero = lesion): the
                         share of each patch's voxels inside a lesion. ``fvlm preprocess`` does not carry
                         lesion maps (the synthetic cohort writes them, the preprocess output has none), so
                         no dataset extra produces this field today; a data pipeline that has lesion masks
                         can pass them;
   ``uniform``           1 on every token of the anatomy;
   ``auto`` (default)    the first available of region_weights, text_attention, lesion, uniform.

   Guide weights are detached: the reconstruction must not teach the region scorer to select tokens that
   are easy to reconstruct. The per-token loss weight normalises each anatomy's guided masked tokens to sum
   to 1 (every anatomy with a guided masked token counts once, whatever its size) and sums over anatomies::

       w_bn = sum_a  M_bn g_ban / sum_n' M_bn' g_ban'          (anatomies with a zero denominator: 0)

   with ``M`` the token mask. Tokens with ``w_bn = 0`` (unmasked, outside every present anatomy, or outside
   the guided region) are not predicted at all.

Outputs (the objective ``guided_reconstruction`` reads the first three)::

    recon_pred          (T, P)  float  predicted voxels of the T counted tokens (w > 0), in (b, n) order
    recon_target        (T, P)  float  their target voxels
    recon_weight        (T,)    float  their weights w
    recon_token_mask    (B, N)  bool   the masked tokens
    recon_token_weight  (B, N)  float  w on the whole grid (a map of where the loss looks)

Cost: one more forward and backward of the vision tower per step (the masked pass), plus the decoder.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fvlm.model.heads import Head, HeadContext, register_head
from fvlm.model.vision import Block, patchify

__all__ = ["MaskedReconstructionHead", "draw_token_mask", "GUIDES"]

GUIDES = ("auto", "region_weights", "region_attention", "text_attention", "lesion", "uniform")


def draw_token_mask(inside: Tensor, guided: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """inside, guided (B, A, N) bool (guided within inside) -> token mask (B, N) bool (module docstring, step 1)."""
    b, a, n = inside.shape
    u = torch.rand(b, 1, n, device=inside.device, generator=generator).expand(b, a, n)  # (B, A, N)
    rest = inside & ~guided
    score = u + 2.0 * rest + 4.0 * ~inside  # guided in [0, 1), the rest of the anatomy in [2, 3), outside [4, 5)
    rank = score.argsort(dim=-1).argsort(dim=-1)  # (B, A, N) rank of each token within its anatomy
    n_guided = guided.sum(-1, keepdim=True)  # (B, A, 1)
    k_guided = torch.ceil(ratio * n_guided.double()).long()
    k_rest = torch.ceil(ratio * rest.sum(-1, keepdim=True).double()).long()
    chosen = (rank < k_guided) | ((rank >= n_guided) & (rank < n_guided + k_rest))
    return (chosen & inside).any(dim=1)  # (B, N)


@register_head("masked_reconstruction")
class MaskedReconstructionHead(Head):
    """Masked voxel reconstruction with guide-weighted loss; see the module docstring.

    Options (``model.heads.masked_reconstruction``):
        mask_ratio: share of each anatomy's tokens (and of its guided tokens) to mask (default 0.5).
        decoder_depth: transformer blocks of the vision width between the tower and the prediction (default 1).
        guide: ``auto``, ``region_weights``, ``region_attention``, ``lesion`` or ``uniform``.
        norm_target: normalise each target patch by its mean and standard deviation (default False).
    """

    batch_keys = ("lesion",)

    def __init__(self, config: Any, mask_ratio: float = 0.5, decoder_depth: int = 1, guide: str = "auto",
                 norm_target: bool = False) -> None:
        super().__init__()
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {', '.join(GUIDES)}, got {guide!r}")
        if int(decoder_depth) < 0:
            raise ValueError(f"decoder_depth must be >= 0, got {decoder_depth}")
        v = config.vision
        self.mask_ratio, self.guide, self.norm_target = float(mask_ratio), guide, bool(norm_target)
        self.patch_size = tuple(v.patch_size)
        voxels = int(v.in_channels) * math.prod(self.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(int(v.width)))
        self.decoder = nn.ModuleList(Block(v) for _ in range(int(decoder_depth)))
        self.norm = nn.LayerNorm(int(v.width), eps=v.layer_norm_eps)
        self.pred = nn.Linear(int(v.width), voxels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, decoder_depth={len(self.decoder)}, guide={self.guide!r}, "
                f"norm_target={self.norm_target}")

    # ------------------------------------------------------------------------------------------ pieces

    def guide_weights(self, ctx: HeadContext, lesion: Tensor | None, inside: Tensor) -> tuple[Tensor, str]:
        """(B, A, N) guide weights g >= 0 (zero outside ``inside``) and the source used."""
        order = {"auto": ("region_weights", "text_attention", "lesion", "uniform")}.get(self.guide, (self.guide,))
        for source in order:
            if source in ("region_weights", "region_attention", "text_attention"):
                g = ctx.extra.get(source)
                if g is None:
                    continue
                if tuple(g.shape) != tuple(inside.shape):
                    raise ValueError(f"masked_reconstruction: ctx.extra[{source!r}] has shape {tuple(g.shape)}, "
                                     f"expected (B, A, N) = {tuple(inside.shape)}")
                g = g.detach().float().clamp_min(0.0)
                if source == "text_attention":  # an anatomy without a masked word: uniform
                    g = torch.where((g * inside).sum(-1, keepdim=True) > 0, g, torch.ones_like(g))
            elif source == "lesion":
                if lesion is None:
                    continue
                if lesion.shape != ctx.anatomy.shape:
                    raise ValueError(f"masked_reconstruction: lesion map {tuple(lesion.shape)} must match the anatomy "
                                     f"map {tuple(ctx.anatomy.shape)} (B, Z, Y, X)")
                frac = patchify((lesion != 0).float().unsqueeze(1), self.patch_size).mean(-1)  # (B, N)
                g = frac.unsqueeze(1).expand_as(inside)  # (B, A, N)
            else:
                g = torch.ones(inside.shape, device=inside.device)
            return g * inside, source
        raise ValueError(f"masked_reconstruction: guide={self.guide!r} but the batch has no such weights "
                         "(region_*: list the region head before masked_reconstruction in model.heads; "
                         "text_attention: list entity_mlm before it; "
                         "lesion: the batch needs a 'lesion' field)")

    @staticmethod
    def token_weights(token_mask: Tensor, guide: Tensor) -> Tensor:
        """token_mask (B, N) bool, guide (B, A, N) -> w (B, N) (module docstring, step 3)."""
        g = guide * token_mask.unsqueeze(1)  # (B, A, N)
        den = g.sum(-1, keepdim=True)  # (B, A, 1)
        return torch.where(den > 0, g / den.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g)).sum(1)

    def forward(self, model: nn.Module, ctx: HeadContext, lesion: Tensor | None = None, **_: Any) -> dict[str, Tensor]:
        inside = ctx.touch.bool() & ctx.anatomy_mask.bool().unsqueeze(-1)  # (B, A, N)
        guide, _source = self.guide_weights(ctx, lesion, inside)
        token_mask = draw_token_mask(inside, guide > 0, self.mask_ratio)  # (B, N)
        x_in = model.vision_input(ctx.image, ctx.anatomy)  # (B, C [+ E anatomy channels], Z, Y, X)
        out = model.vision(x_in, token_mask=token_mask, mask_token=self.mask_token)
        x = out.last  # (B, N, W)
        for block in self.decoder:
            x = block(x)
        weight = self.token_weights(token_mask, guide)  # (B, N)
        counted = weight > 0  # (B, N)
        pred = self.pred(self.norm(x[counted]))  # (T, P)
        target = patchify(ctx.image.float(), self.patch_size)[counted]  # (T, P)
        if self.norm_target:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=False)
            target = (target - mean) / (var + 1e-6).sqrt()
        return {"recon_pred": pred, "recon_target": target, "recon_weight": weight[counted],
                "recon_token_mask": token_mask, "recon_token_weight": weight}
