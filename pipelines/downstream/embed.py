"""``fvlm embed``: frozen per-case, per-anatomy image and report-text embeddings of a preprocessed cohort,
exported in a format read without fvlm (``pipelines.downstream.store``).

Image embeddings are the evaluation's (``pipelines.evaluate.probe.embed_cases`` on the evaluation dataset of
``pipelines.inference.model.eval_dataset``): the same view as ``fvlm evaluate`` (windows around each anatomy by
default, an anatomy's embedding the renormalised mean over the windows where it counts; or the central crop /
resize with ``--view center``), with its masks. Text embeddings: each case's per-anatomy report texts and its
whole report (``case.json``), tokenised as the run trained them (``pipelines.evaluate.ceiling``: recipe
``max_text_len`` / ``report_max_len``) and embedded by ``FVLM.encode_text``, every distinct text once.

Resumable: cases are embedded in chunks of ``--chunk-size`` (in the dataset's order) and each chunk is written
atomically to ``OUTPUT/parts/part-K.safetensors`` beside ``parts/plan.json`` (model fingerprint, case ids,
view, readout, text lengths); a re-run with the same plan embeds only the chunks that are missing, then
merges them into the export and removes ``parts/``. ``meta.json`` is written last: a folder with it is
complete, and re-running on it does nothing. Another checkpoint, cohort or view on the same ``OUTPUT`` is
refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXAMPLE = """example:
  fvlm embed --checkpoint runs/fvlm --data data/prep-test --output emb/fvlm-test
  fvlm embed --checkpoint runs/clip --data data/prep-train --output emb/clip-train --view center --batch-size 8
  python -c "from safetensors.numpy import load_file; print(load_file('emb/fvlm-test/embeddings.safetensors').keys())"
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="export per-case, per-anatomy image and report-text embeddings (safetensors + CSV)",
        description="Embed every case of a preprocess output with a trained model and write OUTPUT/"
        "embeddings.safetensors (per-anatomy and whole-scan image embeddings, per-anatomy and whole-report text "
        "embeddings, presence / cut / text masks), cases.csv, labels.csv (the labels stored by preprocess) and "
        "meta.json. The image view is fvlm evaluate's. Re-running resumes an interrupted export.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="training run folder (uses RUN/model) or export")
    p.add_argument("--data", required=True, type=Path, help="preprocess output folder")
    p.add_argument("--output", required=True, type=Path, help="folder for the export")
    p.add_argument("--view", choices=("windows", "center"), default="windows",
                   help="image view, as fvlm evaluate: windows around each anatomy (default; crop-mode recipes) "
                   "or the central crop / resize")
    p.add_argument("--mode", choices=("crop", "resize"), default=None,
                   help="input view (default: the run's recipe, else a central crop of the model's size)")
    p.add_argument("--crop-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    p.add_argument("--min-inside", type=float, default=0.5,
                   help="fraction of an anatomy's voxels that must be inside a window or crop for it to count "
                   "(default 0.5)")
    p.add_argument("--readout", choices=("auto", "anatomy", "global"), default="auto",
                   help="recorded in meta.json for fvlm probe / retrieve (auto: from the run's recipe, as fvlm "
                   "evaluate; global for clip)")
    p.add_argument("--batch-size", type=int, default=4, help="cases (or windows) per forward pass (default 4)")
    p.add_argument("--chunk-size", type=int, default=32,
                   help="cases per resumable part written to OUTPUT/parts (default 32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an export (finished or not) of another checkpoint, cohort or view in OUTPUT")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = embed(args.checkpoint, args.data, args.output, view_kind=args.view, mode=args.mode,
                crop_size=tuple(args.crop_size) if args.crop_size else None, min_inside=args.min_inside,
                readout=args.readout, batch_size=args.batch_size, chunk_size=args.chunk_size,
                overwrite=args.overwrite, progress=args.progress)
    state = "already complete" if out["skipped"] else f"{out['n_embedded']} case(s) embedded"
    print(f"embeddings of {out['n_cases']} case(s) ({state}; {out['readout']} readout, {out['view']} view): "
          f"{', '.join(str(p) for p in out['files'].values())}")
    return 0


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the export's files (config, weights, tokenizer), names and contents, in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(model_dir)).encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _text_hash(text: str) -> int:
    """A 63-bit key of an exact text (0: no text); only the parts hold it, the export holds dense group ids."""
    if not text:
        return 0
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1 or 1


def _chunk(ds: Any, start: int, stop: int) -> Any:
    """The evaluation dataset restricted to its cases ``start:stop`` (same view, fresh caches)."""
    sub = copy.copy(ds)
    sub.rows = ds.rows[start:stop]
    sub._resized, sub._text_cache = {}, {}
    return sub


def case_labels(case: dict) -> tuple[dict[str, Any], str | None]:
    """(labels, kind) of one ``case.json``: the ground truth stored by preprocess, else the labels parsed from
    the report (``silver``), as ``fvlm evaluate`` reads them; ({}, None) when none."""
    lab = case.get("labels")
    if isinstance(lab, dict) and lab:
        return dict(lab), "ground_truth"
    lab = (((case.get("report") or {}).get("parsed") or {}).get("labels")) or {}
    return (dict(lab), "silver") if lab else ({}, None)


def embed_chunk(model: Any, tok: Any, ds: Any, start: int, stop: int, *, windows, lengths: dict[str, Any],
                batch_size: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays of cases ``start:stop`` of ``ds`` (``*_hash`` int64 text keys in place of the group ids) and their
    case ids and labels."""
    from pipelines.evaluate.ceiling import case_texts, embed_texts
    from pipelines.evaluate.probe import embed_cases

    sub = _chunk(ds, start, stop)
    emb = embed_cases(model, sub, batch_size, windows=windows)
    docs = [sub.case_json(i) for i in range(len(sub))]
    names = list(ds.anatomy_names)
    b, a, d = emb["image_emb"].shape
    present = np.array([[bool(({s.get("name"): s for s in doc.get("anatomies") or []}.get(n) or {}).get("present"))
                         for n in names] for doc in docs], dtype=bool).reshape(b, a)  # (b, A)
    texts = [case_texts(doc, names) for doc in docs]  # [(A texts, report)]
    uniq = sorted({t for ts, _ in texts for t in ts if t})
    runiq = sorted({r for _, r in texts if r})
    temb = embed_texts(model, tok, uniq, lengths["max_text_len"]).numpy()  # (S, D)
    remb = embed_texts(model, tok, runiq, lengths["report_max_len"]).numpy()  # (R, D)
    at, ar = {t: k for k, t in enumerate(uniq)}, {r: k for k, r in enumerate(runiq)}
    text_emb = np.zeros((b, a, d), np.float32)
    text_mask = np.zeros((b, a), bool)
    text_hash = np.zeros((b, a), np.int64)
    report_emb = np.zeros((b, d), np.float32)
    report_mask = np.zeros(b, bool)
    report_hash = np.zeros(b, np.int64)
    for i, (ts, r) in enumerate(texts):
        for k, t in enumerate(ts):
            if t:
                text_emb[i, k], text_mask[i, k], text_hash[i, k] = temb[at[t]], True, _text_hash(t)
        if r:
            report_emb[i], report_mask[i], report_hash[i] = remb[ar[r]], True, _text_hash(r)
    arrays = {"image_emb": emb["image_emb"], "anatomy_mask": emb["anatomy_mask"], "anatomy_present": present,
              "global_image_emb": emb["global_image_emb"], "text_emb": text_emb, "text_mask": text_mask,
              "text_hash": text_hash, "report_emb": report_emb, "report_mask": report_mask,
              "report_hash": report_hash}
    labels = [case_labels(doc) for doc in docs]
    return arrays, {"case_ids": list(sub.case_ids), "labels": [lab for lab, _ in labels],
                    "label_kinds": [k for _, k in labels]}


def _write_part(path: Path, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    from pipelines.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                  metadata={"info": json.dumps(info)})


def _read_part(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        info = json.loads(f.metadata()["info"])
        return {k: f.get_tensor(k) for k in f.keys()}, info


def _groups(hashes: np.ndarray) -> np.ndarray:
    """Dense ids (in order of first appearance) of the non-zero text keys; -1 where 0 (no text)."""
    flat = hashes.reshape(-1)
    out = np.full(flat.shape, -1, np.int32)
    ids: dict[int, int] = {}
    for i, h in enumerate(flat.tolist()):
        if h:
            out[i] = ids.setdefault(h, len(ids))
    return out.reshape(hashes.shape)


def embed(checkpoint: Path, data: Path, output: Path, *, view_kind: str = "windows", mode: str | None = None,
          crop_size: tuple[int, int, int] | None = None, min_inside: float = 0.5, readout: str = "auto",
          batch_size: int = 4, chunk_size: int = 32, overwrite: bool = False, progress: bool = True,
          seed: int = 0) -> dict[str, Any]:
    """Embed ``data``'s cases with the model at ``checkpoint`` into ``output`` (module docstring). Returns
    ``n_cases``, ``n_embedded`` (this call), ``skipped`` (the export was already complete), ``readout``,
    ``view`` and ``files``."""
    import torch
    from tqdm import tqdm

    from pipelines.downstream.store import FORMAT, write_embeddings
    from pipelines.evaluate.ceiling import text_lengths
    from pipelines.evaluate.readout import resolve_readout
    from pipelines.inference.model import data_view, eval_dataset, load_model

    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"--batch-size and --chunk-size must be at least 1, got {batch_size} and {chunk_size}")
    if view_kind not in ("windows", "center"):
        raise ValueError(f"--view must be windows or center, got {view_kind!r}")
    if not 0 < min_inside <= 1:
        raise ValueError(f"--min-inside must be in (0, 1], got {min_inside}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output}: exists and is not a folder")
    model, tok, model_dir = load_model(checkpoint)
    model.eval()
    read = resolve_readout(Path(checkpoint), readout)
    view = data_view(Path(checkpoint), model, mode, crop_size)
    windows = (view["crop_size_zyx"], min_inside) if view_kind == "windows" and view["mode"] == "crop" else None
    view["kind"] = "windows" if windows else ("center" if view["mode"] == "crop" else "resize")
    ds = eval_dataset(Path(data), tok, model, view, seed, min_inside)
    lengths = text_lengths(Path(checkpoint), model)
    # what the export is of (the chunking is not: a resume keeps the chunks it started with)
    plan = {"format": FORMAT, "model_sha256": model_fingerprint(model_dir), "case_ids": list(ds.case_ids),
            "view": view, "min_inside": min_inside, "readout": read, "lengths": lengths}
    plan_sha = hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()
    files = {k: output / k for k in ("embeddings.safetensors", "cases.csv", "meta.json")}
    result = {"n_cases": len(ds), "n_embedded": 0, "skipped": False, "readout": read["readout"],
              "view": view["kind"], "files": files}
    meta_path, parts = output / "meta.json", output / "parts"
    if meta_path.is_file():
        done = json.loads(meta_path.read_text(encoding="utf-8")).get("plan_sha256")
        if done == plan_sha and not overwrite:
            log.info("%s: already complete for this checkpoint, cohort and view", output)
            return {**result, "skipped": True}
        if not overwrite:
            raise FileExistsError(f"--output {output}: holds an export of another checkpoint, cohort or view; "
                                  "give a new --output or --overwrite")
        meta_path.unlink()
    plan_path = parts / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text(encoding="utf-8"))
        if old.get("plan_sha256") != plan_sha:
            if not overwrite:
                raise FileExistsError(f"--output {output}: holds an unfinished export of another checkpoint, cohort "
                                      "or view (parts/); give a new --output or --overwrite")
            shutil.rmtree(parts)
        elif int(old.get("chunk_size", chunk_size)) != chunk_size:
            log.info("%s: resuming with the chunk size it started with, %s", output, old["chunk_size"])
            chunk_size = int(old["chunk_size"])
    from pipelines.atomic import write_text_atomic

    parts.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan_path, json.dumps({**plan, "chunk_size": chunk_size, "plan_sha256": plan_sha}, indent=1)
                      + "\n")
    starts = list(range(0, len(ds), chunk_size))
    todo = [k for k, s in enumerate(starts) if not (parts / f"part-{k:05d}.safetensors").is_file()]
    if len(todo) < len(starts):
        log.info("%s: resuming, %d of %d part(s) already written", output, len(starts) - len(todo), len(starts))
    bar = tqdm(total=len(ds), initial=sum(min(chunk_size, len(ds) - starts[k]) for k in range(len(starts))
                                          if k not in todo),
               unit="case", desc="embed", disable=not progress, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for k in todo:
                start, stop = starts[k], min(len(ds), starts[k] + chunk_size)
                arrays, info = embed_chunk(model, tok, ds, start, stop, windows=windows, lengths=lengths,
                                           batch_size=batch_size)
                if info["case_ids"] != plan["case_ids"][start:stop]:
                    raise RuntimeError(f"part {k}: case ids differ from the plan's")
                _write_part(parts / f"part-{k:05d}.safetensors", arrays, info)
                result["n_embedded"] += stop - start
                bar.update(stop - start)
    finally:
        bar.close()
    loaded = [_read_part(parts / f"part-{k:05d}.safetensors") for k in range(len(starts))]
    cat = {name: np.concatenate([p[0][name] for p in loaded]) for name in loaded[0][0]}
    case_ids = [c for _, info in loaded for c in info["case_ids"]]
    if case_ids != plan["case_ids"]:
        raise RuntimeError(f"{parts}: the parts' case ids differ from the plan's; re-run with --overwrite")
    arrays = {**{k: v for k, v in cat.items() if not k.endswith("_hash")},
              "anatomy_cut": cat["anatomy_present"] & ~cat["anatomy_mask"],
              "text_group": _groups(cat["text_hash"]), "report_group": _groups(cat["report_hash"])}
    labels = {c: lab for _, info in loaded for c, lab in zip(info["case_ids"], info["labels"])}
    kinds = {k for _, info in loaded for k in info["label_kinds"] if k}
    meta = {"anatomy_names": list(ds.anatomy_names), "model": model.config.name, "model_sha256": plan["model_sha256"],
            "view": view, "min_inside": min_inside, "readout": read["readout"], "readout_source": read["source"],
            "text_lengths": lengths, "labels_kind": ("mixed" if len(kinds) > 1 else next(iter(kinds), None)),
            "skipped_cases": len(ds.skipped), "plan_sha256": plan_sha}
    files = write_embeddings(output, arrays, case_ids, labels, meta)
    shutil.rmtree(parts)
    return {**result, "files": files}
