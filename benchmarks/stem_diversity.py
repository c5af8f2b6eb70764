"""Do a freshly built image tower's tokens and anatomy embeddings tell cases apart? Linear vs conv stem.

Why the tiny model learnt nothing (issue 15): a CT patch of 8 x 8 x 8 voxels is smooth, so its vector ``v``
(512 windowed intensities in [0, 1]) is mostly its mean level ``c`` times the all-ones vector. The linear
patch embedding maps it to ``x = c (W 1) + W r + b + p`` (``r`` the small texture residue, ``p`` the position
embedding), and every pre-norm LayerNorm divides out the scale: ``LN(c u + small) ~ LN(u)``. So tokens of soft
tissue, fat and bone point in nearly one direction, density differences are lost until the bias and the
position embedding grow, and the per-anatomy embeddings of different cases are nearly identical: the
contrastive and the supervised losses start with no image signal. The conv stem (``vision.stem: conv``)
passes intensities through GroupNorm (statistics over the whole volume, so levels survive relative to the
case) and GELU (a nonlinearity of the level) before the projection, so tokens of different tissue point in
different directions.

Measured at initialisation (no training), on the central crops of ``--cases`` preprocessed cases:

* token cosine: the mean cosine similarity between the last block's (normalised) tokens of 2,000 random
  token pairs pooled over the cases; 1 means every token is the same direction;
* anatomy embedding cosine: per anatomy, the mean cosine similarity of its pooled embedding between two
  different cases, averaged over anatomies present in both; 1 means the image tower gives every case the
  same embedding.

Usage::

    python -m benchmarks.stem_diversity --data PREP [--cases 16] [--crop 72 48 64] [--patch 8 8 8] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def load_views(data: Path, n: int, crop: tuple[int, int, int], window) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, Z, Y, X) images and (B, Z, Y, X) anatomy maps: the central crop view of the first ``n`` cases."""
    from pipelines.cases.view import crop_box, crop_view

    rows = [json.loads(line) for line in (data / "index.jsonl").read_text().splitlines() if line.strip()][:n]
    if not rows:
        raise SystemExit(f"--data {data}: no cases in index.jsonl")
    imgs, labs = [], []
    for r in rows:
        img, anat = np.load(data / r["image"], mmap_mode="r"), np.load(data / r["anatomy"], mmap_mode="r")
        im, lab, _ = crop_view(img, anat, crop, crop_box(img.shape, crop, None), (False,) * 3, window, -1024)
        imgs.append(im)
        labs.append(lab)
    return torch.stack(imgs), torch.stack(labs).long()  # (B, 1, Z, Y, X): crop_view gives one channel per window


@torch.no_grad()
def diversity(model, image: torch.Tensor, anatomy: torch.Tensor, pairs: int = 2000, seed: int = 0) -> dict:
    """Token and anatomy-embedding cosine similarities of a model at its current weights (module docstring)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(model.vision(image).last.flatten(0, 1), dim=-1)  # (B*N, W)
    i = torch.randint(0, tokens.shape[0], (pairs,), generator=g)
    j = torch.randint(0, tokens.shape[0], (pairs,), generator=g)
    token_cos = float((tokens[i] * tokens[j]).sum(-1).mean())
    enc = model.encode_image(image, anatomy)
    emb, mask = enc["image_emb"], enc["anatomy_mask"]  # (B, A, D), (B, A)
    per = []
    for a in range(emb.shape[1]):
        rows = emb[mask[:, a], a]  # (b, D)
        if rows.shape[0] < 2:
            continue
        sim = rows @ rows.T
        per.append(float(sim[~torch.eye(rows.shape[0], dtype=torch.bool)].mean()))
    return {"token_cos": token_cos, "anatomy_cos": float(np.mean(per)) if per else float("nan"),
            "anatomies": len(per)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="fvlm preprocess output folder (benchmark geometry)")
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--crop", type=int, nargs=3, default=[72, 48, 64], metavar=("Z", "Y", "X"))
    p.add_argument("--patch", type=int, nargs=3, default=[8, 8, 8], metavar=("Z", "Y", "X"))
    p.add_argument("--stem-channels", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--seeds", type=int, default=3, help="model initialisations per stem")
    p.add_argument("--no-record", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = p.parse_args(argv)

    from benchmarks.record import markdown_table, record
    from fvlm.model import create_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    image, anatomy = load_views(args.data, args.cases, tuple(args.crop), (-1150.0, 350.0))
    rows = []
    for stem in ("linear", "conv"):
        vals = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            vision = {"image_size": list(args.crop), "patch_size": list(args.patch), "stem": stem}
            if stem == "conv":
                vision["stem_channels"] = list(args.stem_channels)
            vals.append(diversity(create_model("tiny", vision=vision), image, anatomy, seed=seed))
        rows.append([stem, f"{np.mean([v['token_cos'] for v in vals]):.3f}",
                     f"{np.mean([v['anatomy_cos'] for v in vals]):.4f}", str(vals[0]["anatomies"])])
    table = markdown_table(["stem", "token cosine (mean of pairs)", "anatomy embedding cosine across cases",
                            "anatomies"], rows)
    notes = (f"- {image.shape[0]} cases of `{args.data}`, central {'x'.join(map(str, args.crop))} crop, "
             f"{'x'.join(map(str, args.patch))} patches, tiny model at initialisation, mean over {args.seeds} "
             "seeds; 1.0 = every token / every case the same. Definitions: benchmarks/stem_diversity.py.")
    if args.no_record:
        print(table + "\n\n" + notes)
    else:
        record("Image tower at initialisation: token and anatomy-embedding diversity, linear vs conv stem", table,
               notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
