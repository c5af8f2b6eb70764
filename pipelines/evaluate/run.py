"""Zero-shot evaluation: load an export, score every case, read ground truth, compute the metrics.

Evaluation input: the deterministic view of the training data pipeline (``CaseDataset(train=False)``): the
central crop (``mode=crop``) or the whole case resized (``mode=resize``) at the recipe's size; an anatomy
with less than half its voxels inside the crop is masked (its tasks are missing for that case). Cases with
ground-truth labels but no report are scored too (zero-shot scoring reads only the image).

``view="windows"`` (default): in crop mode, the reference's windows around each anatomy
(``pipelines.inference.windows``: one window of the input size per anatomy, an anatomy counts in a window when
at least ``min_inside`` of it lies inside, a task's score is the mean over the windows where its anatomy
counts, whole-study tasks use the global embedding averaged over windows). In resize mode windows do not
apply (the whole case is the input): the resize view is used and ``info["view_note"]`` says so.
``view="center"``: the central crop (or resize) as above.

Readout (``pipelines.evaluate.readout``): ``anatomy`` reads each task from its anatomy's embedding, ``global``
every task from the whole-scan embedding (CT-CLIP's practice, for whole-scan recipes such as ``clip``), on the
same cases; ``auto`` (default) picks from the run's objectives.

Prompts: the task catalog's template set ``templates`` (default ``"report"``, report-style sentences generated
from the catalog, ``fvlm.zeroshot``), or the model's learned prompt context (``prompts="learned"``).

Scoring (``fvlm.scoring``, ``pipelines.inference.scoring``): each recipe scores with what it trained, as its
objectives declare: the pooled cosine for most, the 2-Wasserstein distance of the Gaussian embeddings for
``fvlm-uncertainty``, the region similarity for ``fvlm-region``; ``fvlm predict`` uses the same scorer.
``info["scorer"]`` records which, who declared it and why. The global readout scores pooled.

Cases: every evaluated case counts in the AUCs (per task, per anatomy, macro, and the ceilings below).
``threshold_split`` sets a validation share of the cases aside only for the threshold metrics: their
threshold is chosen on it and they are reported on the other cases (``info``: ``n_eval`` cases in the AUCs,
``n_validation`` choosing thresholds, ``n_threshold_eval`` scored at them).

Text readout ceiling (``text_ceiling=True``, default; ``pipelines.evaluate.ceiling``): the same prompt bank
scored against each case's own report texts through the text tower, on the same cases as the image scores:
``Evaluation.text_scores`` and ``Evaluation.ceiling`` (per-task AUC, macro over the same included tasks).

Linear-probe ceiling (``probe_data``, a training cohort's preprocess folder; ``pipelines.evaluate.probe``):
a logistic regression per task on the frozen image embeddings, fitted on the training cohort's labels and
scored on the evaluated cases: ``Evaluation.probe_scores`` and ``Evaluation.probe``, reported as the ceiling.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm import metrics as M
from pipelines.inference.model import data_view, eval_dataset, load_model

log = logging.getLogger(__name__)


def read_labels_table(path: Path, case_ids: list[str], tasks: list[Any],
                      option: str = "--labels") -> tuple[np.ndarray, dict]:
    """(N, T) labels from a CSV keyed by case id (column ``case_id``, else the first); NaN where absent.
    ``option``: the command-line option that named the file, for the error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{option} {path}: empty table")
    cols = list(rows[0])
    key = next((c for c in cols if c.lower() in ("case_id", "case", "id", "volumename")), cols[0])
    table = {}
    for r in rows:  # CT-RATE's VolumeName ("train_1_a_1.nii.gz") matches a case id with or without the suffix
        k = str(r[key]).strip()
        table[k] = r
        for suffix in (".nii.gz", ".nii"):
            if k.endswith(suffix):
                table.setdefault(k[: -len(suffix)], r)
                break
    col_of = {}
    for t in tasks:
        col_of[t.name] = next((c for c in (t.name, t.title) if c in cols), None)
    missing_tasks = [n for n, c in col_of.items() if c is None]
    for c in case_ids:
        if c not in table and f"{c}.nii.gz" in table:
            table[c] = table[f"{c}.nii.gz"]
    missing_cases = [c for c in case_ids if c not in table]
    if len(missing_cases) == len(case_ids):
        raise ValueError(f"{option} {path}: none of the {len(case_ids)} cases is in the table (key column {key!r}; "
                         f"first case id {case_ids[0]!r})")
    if len(missing_tasks) == len(tasks):
        raise ValueError(f"{option} {path}: no column for any task (expected task names or titles, e.g. "
                         f"{tasks[0].name!r})")
    y = np.full((len(case_ids), len(tasks)), np.nan)
    for i, cid in enumerate(case_ids):
        row = table.get(cid)
        for j, t in enumerate(tasks):
            c = col_of[t.name]
            if row is None or c is None:
                continue
            v = str(row.get(c, "")).strip()
            if v not in ("", "nan", "NaN", "NA"):
                y[i, j] = float(v)
    if missing_cases or missing_tasks:
        log.warning("labels table %s: %d case(s) and %d task(s) missing (reported as partial coverage)",
                    path, len(missing_cases), len(missing_tasks))
    return y, {"source": str(path), "kind": "table", "missing_cases": missing_cases, "missing_tasks": missing_tasks}


def labels_from_cases(cases: list[dict], tasks: list[Any]) -> tuple[np.ndarray, dict]:
    """Ground truth stored by preprocess (case.json ``labels``), else the parsed reports (silver)."""
    y = np.full((len(cases), len(tasks)), np.nan)
    kinds = set()
    for i, case in enumerate(cases):
        lab = case.get("labels")
        kind = "ground_truth"
        if not isinstance(lab, dict) or not lab:
            lab = (((case.get("report") or {}).get("parsed") or {}).get("labels")) or {}
            kind = "silver"
        if lab:
            kinds.add(kind)
        for j, t in enumerate(tasks):
            v = lab.get(t.name)
            if v is not None:
                y[i, j] = float(v)
    kind = "silver" if kinds == {"silver"} else ("mixed" if len(kinds) > 1 else "ground_truth")
    return y, {"source": "case.json", "kind": kind, "missing_cases": [], "missing_tasks": []}


def select_tasks(catalog: Any, ct_rate_labels: int = 16) -> list[str]:
    """Task names to evaluate: every task of the catalog, except for CT-RATE, where ``ct_rate_labels=16`` keeps
    the 16 anatomy-bound labels (as the fVLM paper) and ``18`` all, whole-study labels through the global
    embedding."""
    if ct_rate_labels not in (16, 18):
        raise ValueError(f"--ct-rate-labels must be 16 or 18, got {ct_rate_labels}")
    names = [t.name for t in catalog.tasks]
    if catalog.name == "ct-rate" and ct_rate_labels == 16:
        names = [t.name for t in catalog.tasks if t.anatomy is not None]
    return names


@torch.no_grad()
def score_embeddings(emb: dict[str, Any], bank: Any, logit_scale: float, readout: str = "anatomy",
                     chunk: int = 256) -> np.ndarray:
    """(N, T) zero-shot scores of :func:`pipelines.evaluate.probe.embed_cases` embeddings; ``readout="global"``
    scores every task from the global embedding (``pipelines.evaluate.readout``), NaN where the anatomy is
    masked as with the anatomy readout."""
    from fvlm.zeroshot import score_cases
    from pipelines.evaluate.readout import global_rows

    if readout not in ("anatomy", "global"):
        raise ValueError(f"readout must be anatomy or global, got {readout!r}")
    out = []
    for start in range(0, len(emb["global_image_emb"]), chunk):
        image = torch.from_numpy(emb["image_emb"][start:start + chunk])  # (b, A, D)
        mask = torch.from_numpy(emb["anatomy_mask"][start:start + chunk])  # (b, A)
        g = torch.from_numpy(emb["global_image_emb"][start:start + chunk])  # (b, D)
        if readout == "global":
            image = global_rows(image, g)
        out.append(score_cases(image, mask, bank, logit_scale, g))
    return np.concatenate(out) if out else np.zeros((0, len(bank)))


@torch.no_grad()
def score_dataset(model: Any, dataset: Any, bank: Any, batch_size: int = 4, readout: str = "anatomy") -> np.ndarray:
    """(N, T) zero-shot scores of ``dataset``'s deterministic view (central crop or resize)."""
    from pipelines.evaluate.probe import embed_cases

    return score_embeddings(embed_cases(model, dataset, batch_size), bank, float(model.logit_scale().detach()),
                            readout)


@torch.no_grad()
def classifier_scores(model: Any, dataset: Any, task_names: list[str], batch_size: int = 4) -> np.ndarray:
    """(N, T) logits of a supervised model's ``task_classifier`` head (``fvlm.supervised.supervised_scores``) on
    ``dataset``'s deterministic view; NaN where the task's anatomy is masked or the head has no such task."""
    from fvlm.supervised import supervised_scores

    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        out.append(supervised_scores(model, torch.stack([it["image"] for it in items]),
                                     torch.stack([it["anatomy"] for it in items]),
                                     torch.stack([it["cut"] for it in items]), task_names))
    return np.concatenate(out) if out else np.zeros((0, len(task_names)))


@torch.no_grad()
def score_windows(model: Any, dataset: Any, bank: Any, size_zyx, min_inside: float = 0.5,
                  batch_size: int = 4, readout: str = "anatomy") -> tuple[np.ndarray, list[int]]:
    """(N, T) scores from the windows around each anatomy; also the number of windows per case."""
    from pipelines.inference.windows import dataset_window_scores, score_case_windows

    scale = float(model.logit_scale().detach())
    return dataset_window_scores(dataset, size_zyx, min_inside, len(bank),
                                 lambda cw: score_case_windows(model, cw, bank, scale, batch_size, readout=readout)[0])


def task_metrics(y: np.ndarray, s: np.ndarray, val: np.ndarray | None, *, min_positives: int, n_boot: int,
                 seed: int) -> M.TaskMetrics:
    """One task's metrics. The AUC, its flags and the optimistic (same-set) threshold metrics count every case;
    with a validation mask ``val`` the validation threshold is chosen on those cases and its metrics are
    reported on the others (``validation``, ``val_n_*``)."""
    r = M.evaluate_task(y, s, min_positives=min_positives, n_boot=n_boot, seed=seed)
    if val is None:
        return r
    t = M.evaluate_task(y[~val], s[~val], val_true=y[val], val_score=s[val], min_positives=min_positives,
                        n_boot=0, seed=seed)
    notes = tuple(n for n in r.notes if not n.startswith("validation:"))
    notes += tuple(n for n in t.notes if n.startswith("validation:"))
    return replace(r, validation=t.validation, val_n_pos=t.val_n_pos, val_n_neg=t.val_n_neg,
                   val_n_missing=t.val_n_missing, notes=notes)


@dataclass
class Evaluation:
    case_ids: list[str]
    tasks: list[Any]
    scores: np.ndarray
    labels: np.ndarray
    val_mask: np.ndarray | None
    results: dict[str, M.TaskMetrics]
    summary: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    maps: list[dict[str, Any]] = field(default_factory=list)  #: ``finding_maps`` (arrays), for the report
    text_scores: np.ndarray | None = None  #: (N, T) text readout ceiling scores (None: not computed)
    ceiling: dict[str, Any] | None = None  #: ``pipelines.evaluate.ceiling.ceiling_metrics`` + text counts
    probe_scores: np.ndarray | None = None  #: (N, T) linear-probe decision scores (None: no ``probe_data``)
    probe: dict[str, Any] | None = None  #: ``pipelines.evaluate.probe.probe_metrics`` + the fits

    @property
    def threshold_mask(self) -> np.ndarray:
        """(N,) bool: the cases the validation-threshold metrics are reported on (all but the validation split).
        The AUCs, the ceilings and the probe count every case."""
        return ~self.val_mask if self.val_mask is not None else np.ones(len(self.case_ids), dtype=bool)


@torch.no_grad()
def finding_maps(model: Any, tok: Any, dataset: Any, bank: Any, scores: np.ndarray, labels: np.ndarray,
                 cases: np.ndarray, n: int) -> list[dict[str, Any]]:
    """For the first ``n`` of ``cases`` (bool mask) with a positive anatomy-bound finding, the map of their
    top-scoring positive finding on the evaluation view (``fvlm.localize`` with a region head, else the pooled
    ``fvlm.heatmap``), as the axial slice through the map's peak: image, map (upsampled) and anatomy outline."""
    from fvlm.heatmap import task_heatmap, upsample_to_input

    region = "region" in getattr(model, "heads", {})
    out: list[dict[str, Any]] = []
    for i in np.flatnonzero(cases):
        pos = [j for j in range(len(bank)) if bank.anatomy_index[j] >= 0 and labels[i, j] == 1
               and np.isfinite(scores[i, j])]
        if not pos:
            continue
        j = max(pos, key=lambda t: scores[i, t])
        a = bank.anatomy_index[j]
        sample = dataset[int(i)]
        image, anatomy = sample["image"][None], sample["anatomy"][None]
        if region and bank.prompts[j][0]:
            from fvlm.localize import prompt_tokens, region_map

            tmap, _ = region_map(model, image, anatomy, *prompt_tokens(model, tok, bank.prompts[j][0]), a)
            method = "region head (fvlm.localize)"
        else:
            tmap, _ = task_heatmap(model, image, anatomy, bank.positive[j], bank.negative[j], a, "probability")
            method = "pooled token probability (fvlm.heatmap)"
        up = upsample_to_input(tmap, tuple(image.shape[2:]))[0] * (anatomy[0] == a + 1)  # (Z, Y, X)
        z = int(np.unravel_index(int(up.argmax()), tuple(up.shape))[0])
        out.append({"case_id": dataset.case_ids[int(i)], "task": bank.task_names[j], "anatomy": bank.anatomies[j],
                    "score": float(scores[i, j]), "method": method, "z": z, "image": image[0, 0, z].numpy(),
                    "map": up[z].numpy(), "anatomy_mask": (anatomy[0, z] == a + 1).numpy()})
        if len(out) >= n:
            break
    return out


def source_hash(case: dict) -> str | None:
    """The source scan's hash that ``fvlm preprocess`` writes to ``case.json`` (None when absent)."""
    src = case.get("source") if isinstance(case, dict) else None
    return str(src["hash"]) if isinstance(src, dict) and src.get("hash") else None


def probe_ceiling(model: Any, tok: Any, probe_data: Path, probe_labels: Path | None, tasks: list[Any], bank: Any,
                  view: dict, eval_emb: dict[str, Any], labels: np.ndarray, image_scores: np.ndarray,
                  summary: dict[str, Any], *, readout: str, windows, folds: int, seed: int, n_boot: int,
                  min_inside: float, batch_size: int, eval_sources: dict[str, str | None] | None = None
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """The linear-probe ceiling (``pipelines.evaluate.probe``): embed ``probe_data`` (the training cohort) in the
    evaluation's view, fit a probe per task on its labels, score the evaluated cases' embeddings ``eval_emb``
    (NaN where ``image_scores`` is NaN: the same cases), and their metrics over every evaluated case.
    ``eval_sources`` (case id -> ``case.json`` source hash of the evaluated cases): a case id of both folders
    counts as the same case (not held out) unless both source hashes are known and differ (two synthetic
    cohorts number their cases alike)."""
    from pipelines.evaluate.probe import C_GRID, embed_cases, fit_probe, probe_metrics, probe_scores

    train = eval_dataset(probe_data, tok, model, view, seed, min_inside, option="--probe-data")
    log.info("linear probe: embedding %d training case(s) of %s", len(train), probe_data)
    train_emb = embed_cases(model, train, batch_size, windows=windows)
    if probe_labels is not None:
        y_train, train_labels = read_labels_table(probe_labels, train.case_ids, tasks, option="--probe-labels")
    else:
        y_train, train_labels = labels_from_cases([train.case_json(i) for i in range(len(train))], tasks)
    overlap = sorted(set(train.case_ids) & set(eval_emb["case_ids"]))
    if overlap and eval_sources:  # the same id is the same case only when it comes from the same source scan
        train_sources = {c: source_hash(train.case_json(train.case_ids.index(c))) for c in overlap}
        overlap = [c for c in overlap if train_sources[c] is None or eval_sources.get(c) is None
                   or train_sources[c] == eval_sources[c]]
    if overlap:
        log.warning("linear probe: %d case id(s) of --probe-data are also evaluated (e.g. %s): the probe is not "
                    "held out for them", len(overlap), overlap[0])
    log.info("linear probe: fitting %d task(s) (%d-fold cross-validation of C)", len(tasks), folds)
    fits = fit_probe(train_emb, y_train, list(bank.anatomy_index), [t.name for t in tasks], readout=readout,
                     folds=folds, seed=seed)
    scores = probe_scores(fits, eval_emb)
    scores[np.isnan(image_scores)] = np.nan
    cases = np.ones(len(scores), dtype=bool)
    info = {**probe_metrics(tasks, labels, scores, cases, summary, n_boot, seed),
            "data": str(probe_data), "labels": train_labels, "n_train_cases": len(train),
            "n_overlap_cases": len(overlap), "readout": readout, "embedding_view": train_emb["view"],
            "folds": folds, "c_grid": list(C_GRID), "fits": {f.task: f.to_dict() for f in fits},
            "tasks_skipped": {f.task: f.reason for f in fits if f.reason}}
    return scores, info


def evaluate(checkpoint: Path, data: Path, tasks_name: str, *, labels: Path | None = None,
             threshold_split: float | None = 0.2, n_boot: int = 1000, seed: int = 0, min_positives: int = 10,
             templates: str | None = None, mode: str | None = None, crop_size=None, batch_size: int = 4,
             view_kind: str = "windows", min_inside: float = 0.5, ct_rate_labels: int = 16,
             prompts: str = "catalog", maps: int = 0, text_ceiling: bool = True, readout: str = "auto",
             probe_data: Path | None = None, probe_labels: Path | None = None, probe_folds: int = 5) -> Evaluation:
    """Score ``data``'s cases with the export at ``checkpoint`` on the catalog ``tasks_name`` (module
    docstring); ``templates`` a template set of ``fvlm.zeroshot`` (None: its default, ``"report"``);
    ``text_ceiling`` also scores the cases' own report texts (the text readout ceiling); ``readout``
    ``auto | anatomy | global`` (``pipelines.evaluate.readout``); ``probe_data`` (a training cohort's
    preprocess folder, labels from its cases or ``probe_labels``) adds the linear-probe ceiling.

    Every evaluated case counts in the AUCs (per task, per anatomy, macro, ceilings, probe);
    ``threshold_split`` sets aside a validation share of them only to choose the thresholds of the
    threshold metrics, which are reported on the other cases."""
    from anatomy.catalog import load_task_catalog
    from fvlm.prompts import DEFAULT_TEMPLATES
    from fvlm.zeroshot import encode_prompts
    from pipelines.evaluate.readout import resolve_readout

    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder (give an fvlm preprocess output folder)")
    if probe_data is not None and not Path(probe_data).is_dir():
        raise FileNotFoundError(f"--probe-data {probe_data}: no such folder (give the training cohort's fvlm "
                                "preprocess output folder)")
    if probe_labels is not None and probe_data is None:
        raise ValueError("--probe-labels needs --probe-data (the training cohort the labels belong to)")
    if probe_folds < 2:
        raise ValueError(f"--probe-folds must be at least 2, got {probe_folds}")
    model, tok, model_dir = load_model(checkpoint)
    catalog = load_task_catalog(tasks_name)
    task_names = select_tasks(catalog, ct_rate_labels)
    if prompts not in ("catalog", "learned"):
        raise ValueError(f"--prompts must be catalog or learned, got {prompts!r}")
    read = resolve_readout(Path(checkpoint), readout)
    bank = encode_prompts(model, tok, catalog, templates=templates or DEFAULT_TEMPLATES, tasks=task_names,
                          learned=prompts == "learned")
    from pipelines.inference.scoring import resolve_scorer, scorer_info

    scorer, spec, spec_source = resolve_scorer(Path(checkpoint), model)
    if spec.name != "pooled" and read["readout"] == "global":  # the global embedding has no Gaussian or regions
        from fvlm.scoring import ScorerSpec, create_scorer

        spec = ScorerSpec("pooled", {}, f"global readout: the whole-scan embedding is scored pooled (the recipe's "
                                        f"{spec.name} scorer reads per-anatomy outputs)")
        scorer = create_scorer("pooled")
    if view_kind not in ("windows", "center"):
        raise ValueError(f"--view must be windows or center, got {view_kind!r}")
    if not 0 < min_inside <= 1:
        raise ValueError(f"--min-inside must be in (0, 1], got {min_inside}")
    view = data_view(Path(checkpoint), model, mode, crop_size)
    ds = eval_dataset(data, tok, model, view, seed, min_inside)
    case_ids = ds.case_ids
    tasks = [catalog[n] for n in task_names]
    if [t.name for t in tasks] != list(bank.task_names):
        raise RuntimeError(f"the prompt bank's tasks {list(bank.task_names)} are not in the catalog order")
    log.info("scoring %d case(s) on %d task(s), %s readout", len(case_ids), len(tasks), read["readout"])
    n_windows, windows, emb = None, None, None
    supervised = "task_classifier" in getattr(model, "heads", {})
    if supervised:  # the supervised ceiling recipe: its classifier's logits, no prompts, the central view
        view_kind, text_ceiling = "center", False
        read = {"readout": "classifier", "source": "the model's task_classifier head (supervised recipe)"}
    special = spec.name != "pooled" and not supervised  # a recipe scorer other than the pooled cosine
    scorer_prompts = scorer.prepare(model, tok, bank) if special else None
    if view_kind == "windows" and view["mode"] == "crop":
        windows = (view["crop_size_zyx"], min_inside)
        if special:
            from pipelines.inference.scoring import scorer_window_scores

            scores, n_windows = scorer_window_scores(model, scorer, scorer_prompts, ds, view["crop_size_zyx"],
                                                     min_inside, batch_size)
        else:
            scores, n_windows = score_windows(model, ds, bank, view["crop_size_zyx"], min_inside, batch_size,
                                              read["readout"])
        view_note = (f"windows around each anatomy ({'x'.join(map(str, view['crop_size_zyx']))}, z y x; padded with "
                     f"air): an anatomy counts in a window when >= {min_inside:g} of its voxels lie inside; a task's "
                     "score is the mean over the windows where its anatomy counts; whole-study tasks use the global "
                     "embedding averaged over the case's windows")
        view["kind"] = "windows"
    else:
        from pipelines.evaluate.probe import embed_cases

        if supervised:  # the classifier's own pass; the probe (if any) embeds the cases below
            scores = classifier_scores(model, ds, task_names, batch_size)
        elif special:  # the recipe's own scorer; the probe (if any) embeds the cases below
            from pipelines.inference.scoring import scorer_dataset_scores

            scores = scorer_dataset_scores(model, scorer, scorer_prompts, ds, batch_size)
        else:
            emb = embed_cases(model, ds, batch_size)
            scores = score_embeddings(emb, bank, float(model.logit_scale().detach()), read["readout"])
        view["kind"] = "center" if view["mode"] == "crop" else "resize"
        view_note = ("central crop of the deterministic eval view" if view["mode"] == "crop" else
                     "whole case resized to the input size")
        if view_kind == "windows" and view["mode"] == "resize":
            view_note += ("; windows were asked for but do not apply to a resize-mode recipe (the model sees the "
                          "whole case), so the resize view is used")
        else:
            view_note += f"; an anatomy with < {min_inside:g} of its voxels inside is masked"
    if supervised:
        view_note += ("; supervised ceiling: each task scored by the model's own classifier logit (trained on the "
                      "labels, not zero-shot); no text readout ceiling")
    if read["readout"] == "global":
        view_note += ("; global readout: every task scored from the whole-scan embedding (window-averaged in the "
                      "windows view), on the cases where its anatomy counts")
    case_docs = [ds.case_json(i) for i in range(len(ds))] if (labels is None or text_ceiling) else []
    if labels is not None:
        y, label_info = read_labels_table(labels, case_ids, tasks)
    else:
        y, label_info = labels_from_cases(case_docs, tasks)

    val = None
    if threshold_split:
        val = M.split_validation(case_ids, threshold_split, seed)
        if val.all() or not val.any():
            log.warning("validation split of %d case(s) is empty or everything; no validation thresholds", len(val))
            val = None
    every = np.ones(len(case_ids), dtype=bool)  # the AUCs count every evaluated case
    results = {t.name: task_metrics(y[:, j], scores[:, j], val, min_positives=min_positives, n_boot=n_boot,
                                    seed=seed) for j, t in enumerate(tasks)}
    groups = {t.name: (t.anatomy or "whole_study") for t in tasks}
    summary = M.macro_summary(results, groups, y_true={t.name: y[:, j] for j, t in enumerate(tasks)},
                              scores={t.name: scores[:, j] for j, t in enumerate(tasks)},
                              n_boot=n_boot, seed=seed)
    missing_scores = {t.name: int(np.isnan(scores[:, j]).sum()) for j, t in enumerate(tasks)}
    text_scores, ceiling = None, None
    if text_ceiling:
        from pipelines.evaluate.ceiling import ceiling_metrics, ceiling_scores, text_lengths

        names = list(ds.anatomy_names or catalog.anatomy_set.names)
        text_scores, text_info = ceiling_scores(model, tok, case_docs, names, bank,
                                                text_lengths(Path(checkpoint), model), scores,
                                                readout=read["readout"])
        ceiling = {**ceiling_metrics(tasks, y, text_scores, every, summary, n_boot, seed), **text_info,
                   "readout": read["readout"]}
    p_scores, probe = None, None
    if probe_data is not None:
        if emb is None:  # the windows view or a supervised run: embed the cases for the probe
            from pipelines.evaluate.probe import embed_cases

            emb = embed_cases(model, ds, batch_size, windows=windows)
        p_scores, probe = probe_ceiling(model, tok, Path(probe_data), probe_labels, tasks, bank, view, emb, y, scores,
                                        summary, readout="anatomy" if supervised else read["readout"],
                                        windows=windows, folds=probe_folds,
                                        eval_sources={c: source_hash(doc) for c, doc in zip(
                                            case_ids, case_docs or (ds.case_json(i) for i in range(len(ds))))},
                                        seed=seed, n_boot=n_boot, min_inside=min_inside, batch_size=batch_size)
    threshold_cases = ~val if val is not None else every
    info = {
        "checkpoint": str(model_dir), "model": model.config.name, "data": str(data), "tasks": catalog.name, "task_names": task_names,
        "ct_rate_labels": ct_rate_labels if catalog.name == "ct-rate" else None,
        "n_cases": len(case_ids),  # every evaluated case
        "n_eval": int(every.sum()),  # cases the AUCs count (per task, per anatomy, macro, ceilings, probe): all
        "n_validation": int(val.sum()) if val is not None else 0,  # cases that choose the validation thresholds
        "n_threshold_eval": int(threshold_cases.sum()),  # cases the validation-threshold metrics are reported on
        "threshold_split": threshold_split if val is not None else None, "n_boot": n_boot, "seed": seed,
        "min_positives": min_positives, "templates": bank.templates, "prompts": prompts, "labels": label_info,
        "readout": read["readout"], "readout_source": read["source"],
        "view": view,
        "view_note": view_note, "min_inside": min_inside,
        "windows_per_case": ({c: n for c, n in zip(case_ids, n_windows)} if n_windows is not None else None),
        "skipped_cases": [list(s) for s in ds.skipped], "logit_scale": float(model.logit_scale().detach()),
        "missing_scores": missing_scores, "text_ceiling": text_ceiling, "probe": probe_data is not None,
        "scorer": (scorer_info(scorer, spec, spec_source) if not supervised else
                   {"name": "classifier", "score": "the task_classifier head's logits (supervised ceiling)"}),
    }
    ev_maps = finding_maps(model, tok, ds, bank, scores, y, every, maps) if maps > 0 else []
    info["maps"] = [{k: v for k, v in m.items() if not isinstance(v, np.ndarray)} for m in ev_maps]
    return Evaluation(case_ids, tasks, scores, y, val, results, summary, info, ev_maps, text_scores=text_scores,
                      ceiling=ceiling, probe_scores=p_scores, probe=probe)
