"""TotalSegmentator's ``total`` task class map, shipped as data in ``configs/totalsegmentator/total.yaml``.

Anatomy sets group these classes; synthetic label maps are written in these ids, so that a label map from
the real TotalSegmentator and one from ``fvlm synth`` are interchangeable downstream.
"""

from __future__ import annotations

from functools import lru_cache

import yaml

from configs.paths import config_dir


@lru_cache(maxsize=None)
def total_classes() -> dict[int, str]:
    """Label id -> class name of TotalSegmentator's ``total`` task (117 classes, ids 1..117)."""
    path = config_dir() / "totalsegmentator" / "total.yaml"
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    classes = {int(k): str(v) for k, v in data["classes"].items()}
    if len(set(classes.values())) != len(classes):
        raise ValueError(f"{path}: duplicate class names")
    return classes


@lru_cache(maxsize=None)
def total_class_ids() -> dict[str, int]:
    """Class name -> label id of TotalSegmentator's ``total`` task."""
    return {name: idx for idx, name in total_classes().items()}
