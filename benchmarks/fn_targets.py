"""How much each false-negative correction changes the contrastive targets on real training batches.

The fVLM recipes differ only in their soft targets Y (A, N, N) (``fvlm.losses.anatomy``): ``fvlm-plain``
(``anatomy_infonce``) has Y = same case only; ``fvlm`` (``anatomy_contrastive``) adds pairs whose anatomy is
normal on both sides and pairs with identical anatomy texts; ``fvlm-disease`` (``disease_aware``) adds pairs
with the same findings. When the normal flag misses normal texts, the first two coincide and the comparison
``fvlm`` vs ``fvlm-plain`` measures nothing. This benchmark builds the loader's batches of a preprocessed
cohort exactly as training does (``CaseDataset`` through the recipe's batch size and sampler order) and counts,
per anatomy, the off-diagonal pairs that each objective makes positive, among the pairs the loss sees (both
anatomies present), over anatomies that contribute (at least one abnormal sample in the batch).

    .venv/bin/python -m benchmarks.fn_targets --data data/bench-quality/prep/train --batch 16 --batches 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.record import markdown_table, record

OBJECTIVES = (("fvlm-plain", "anatomy_infonce", {}), ("fvlm", "anatomy_contrastive", {}),
              ("fvlm-disease", "disease_aware", {"mode": "exact"}))


def measure(data: Path, batch: int, batches: int, size: tuple[int, int, int] = (32, 64, 64), seed: int = 0) -> dict:
    """Per anatomy and objective: off-diagonal positive pairs / pairs seen, plus the normal-flag share. An
    anatomy is present in a sample when its label survives the resize to ``size`` (the quality benchmark's
    view; the model's anatomy mask is its token touch map, the same anatomies)."""
    from fvlm.losses import create_objective
    from fvlm.model.tokenizer import train_wordpiece
    from pipelines.cases.dataset import CaseDataset
    from pipelines.cases.format import corpus_texts
    from pipelines.cases.loader import ResumableSampler, collate

    tok = train_wordpiece(corpus_texts(data)[:2000], vocab_size=2000, max_length=64)
    ds = CaseDataset(data, tok, crop_size_zyx=size, mode="resize", train=False, max_text_len=16)
    sampler = ResumableSampler(len(ds), batch_size=batch, seed=seed)
    order = sampler.epoch_indices(0)
    names = ds.anatomy_names
    a = len(names)
    pairs = np.zeros(a)
    positives = {label: np.zeros(a) for label, _, _ in OBJECTIVES}
    normal = np.zeros(a)
    samples = np.zeros(a)
    objectives = {label: create_objective(name, **opts) for label, name, opts in OBJECTIVES}
    for b in range(min(batches, len(order) // batch)):
        items = [ds[i] for i in order[b * batch:(b + 1) * batch]]
        x = collate(items)
        present = x["anatomy"].flatten(1)  # (B, V)
        mask = torch.stack([(present == k + 1).any(1) for k in range(a)], 1)  # (B, A)
        pres = mask.T  # (A, B)
        contributes = pres.sum(-1) >= 2
        contributes &= (pres & ~x["normal"].T).any(-1)
        valid = pres.unsqueeze(-1) & pres.unsqueeze(-2) & ~torch.eye(batch, dtype=torch.bool)  # (A, B, B)
        valid &= contributes.view(-1, 1, 1)
        pairs += valid.sum((1, 2)).numpy()
        normal += (x["normal"] & mask).sum(0).numpy()
        samples += mask.sum(0).numpy()
        for label, obj in objectives.items():
            extra = obj._gather_extra(x)
            y = obj.soft_targets(x["case_id"], x["text_id"] if obj.identical_text else None,
                                 x["normal"], extra, pres)  # (A, B, B)
            positives[label] += ((y > 0) & valid).sum((1, 2)).numpy()
    return {"anatomies": names, "pairs": pairs, "positives": positives, "normal": normal, "samples": samples,
            "batches": min(batches, len(order) // batch)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/bench-quality/prep/train"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--size", type=int, nargs=3, default=[32, 64, 64], help="resize view (z y x)")
    args = ap.parse_args(argv)
    m = measure(args.data, args.batch, args.batches, tuple(args.size))
    rows = []
    for k, name in enumerate(m["anatomies"]):
        share = lambda label: f"{m['positives'][label][k] / m['pairs'][k]:.3f}" if m["pairs"][k] else "n/a"  # noqa: E731
        rows.append([name, f"{m['normal'][k] / max(1, m['samples'][k]):.2f}", int(m["pairs"][k])]
                    + [share(label) for label, _, _ in OBJECTIVES])
    tot = {label: m["positives"][label].sum() / max(1, m["pairs"].sum()) for label, _, _ in OBJECTIVES}
    rows.append(["**all**", f"{m['normal'].sum() / max(1, m['samples'].sum()):.2f}", int(m["pairs"].sum())]
                + [f"**{tot[label]:.3f}**" for label, _, _ in OBJECTIVES])
    table = markdown_table(["anatomy", "normal flag share", "pairs seen"]
                           + [f"{label} positive share" for label, _, _ in OBJECTIVES], rows)
    notes = (f"- {m['batches']} batches of {args.batch} in the training sampler's epoch-0 order over "
             f"`{args.data}` (resize view {'x'.join(map(str, args.size))}); pairs seen: off-diagonal pairs of "
             "samples whose anatomy is present, in anatomies "
             "that contribute to the loss (at least one abnormal sample in the batch)\n"
             "- positive share: the part of those pairs that the objective's soft targets make positive "
             "(fvlm-plain: none, by definition)")
    record("False-negative correction: positive pairs per objective on training batches", table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
