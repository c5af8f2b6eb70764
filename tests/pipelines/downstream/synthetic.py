"""A synthetic ``fvlm embed`` export with planted structure, written through the real writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.downstream.store import write_embeddings

NAMES = ['lung', 'heart', 'aorta', 'esophagus', 'liver', 'gallbladder', 'spleen', 'pancreas', 'kidney',
         'adrenal_gland', 'stomach', 'small_bowel', 'colon', 'urinary_bladder', 'bone']
W = np.linspace(1.0, -1.0, 16)  # the planted direction, the same in every cohort


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_export(folder: Path, n: int, seed: int, *, d: int = 16, text_noise: float = 0.0, model_sha: str = "m0",
                 readout: str = "anatomy", masked: float = 0.0, prefix: str = "c") -> dict:
    """``lung_nodule`` is linear in the lung embedding, ``emphysema`` pure noise; every anatomy's text is its
    image embedding plus ``text_noise`` (0: identical pairs); report text = the whole-scan embedding. Returns
    the arrays."""
    rng = np.random.default_rng(seed)
    a = len(NAMES)
    image = _unit(rng.normal(size=(n, a, d)))  # (N, A, D)
    mask = rng.random((n, a)) >= masked  # (N, A)
    mask[:, 0] = True
    glob = _unit(rng.normal(size=(n, d)))  # (N, D)
    text = _unit(image + text_noise * rng.normal(size=image.shape))
    arrays = {"image_emb": image * mask[..., None], "anatomy_mask": mask, "anatomy_present": np.ones((n, a), bool),
              "anatomy_cut": ~mask, "global_image_emb": glob, "text_emb": text, "text_mask": np.ones((n, a), bool),
              "text_group": np.arange(n * a, dtype=np.int32).reshape(n, a), "report_emb": glob.copy(),
              "report_mask": np.ones(n, bool), "report_group": np.arange(n, dtype=np.int32)}
    y = (image[:, 0] @ W > 0.1).astype(int)
    noise = (rng.random(n) < 0.4).astype(int)
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    labels = {c: {"lung_nodule": int(y[i]), "emphysema": int(noise[i])} for i, c in enumerate(ids)}
    write_embeddings(folder, arrays, ids, labels, {"anatomy_names": NAMES, "model": "synthetic",
                                                   "model_sha256": model_sha, "view": {"kind": "center"},
                                                   "readout": readout, "labels_kind": "ground_truth"})
    return arrays
