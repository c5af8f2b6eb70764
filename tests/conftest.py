"""Fixtures shared by every test module: synthetic cohorts run through ``fvlm preprocess``, built once per session.

A cohort is made for each (cases, seed, normal_share) the first time a test asks for it, then reused by every
module that asks for the same settings, so the suite preprocesses each cohort once instead of once per module.
Cohorts are read-only: a test that changes one copies it first (``shutil.copytree``) and trains, evaluates or
predicts into its own ``tmp_path``.

Markers: ``slow`` (pyproject.toml) marks the tests that train, run the demo or a command in a subprocess;
``pytest -m "not slow"`` is the fast subset, the full suite is what CI runs (docs/development.md#tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Cohort:
    """A synthetic cohort and its preprocess output, in one session folder."""

    root: Path  # the folder holding everything below
    synth: Path  # make_cohort's output: images/, segmentations/, truth/, reports.csv, labels.csv
    prep: Path  # fvlm preprocess output (fast config, masks, reports and labels, case ids from the file names)
    config: Path  # the preprocess config it ran with (tests.pipelines.preprocess.preprocess_fixtures.FAST_CONFIG)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``synthetic(cases, seed, fmt="nifti") -> Path``: a raw synthetic cohort (images/, segmentations/, truth/,
    reports.csv, labels.csv; a third normal), made on first use and shared by every later caller with the same
    settings."""
    from tests.pipelines.preprocess.preprocess_fixtures import cohort

    made: dict[tuple[int, int, str], Path] = {}

    def get(cases: int, seed: int, fmt: str = "nifti") -> Path:
        key = (cases, seed, fmt)
        if key not in made:
            made[key] = cohort(tmp_path_factory.mktemp(f"synth-{cases}-seed{seed}-{fmt}"), cases=cases, fmt=fmt,
                               seed=seed)
        return made[key]

    return get


@pytest.fixture(scope="session")
def preprocessed(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Cohort]:
    """``preprocessed(cases, seed, normal_share=0.25) -> Cohort``: a NIfTI synthetic cohort preprocessed with the
    fast config, built on first use and shared by every later caller with the same settings."""
    from tests.pipelines.preprocess.preprocess_fixtures import preprocessed_cohort

    made: dict[tuple[int, int, float], Cohort] = {}

    def get(cases: int, seed: int, normal_share: float = 0.25) -> Cohort:
        key = (cases, seed, normal_share)
        if key not in made:
            root = tmp_path_factory.mktemp(f"cohort-{cases}-seed{seed}-normal{normal_share}")
            prep = preprocessed_cohort(root, cases=cases, seed=seed, normal_share=normal_share)
            made[key] = Cohort(root=root, synth=root / "synth", prep=prep, config=root / "fast.yaml")
        return made[key]

    return get


@pytest.fixture(scope="session")
def cohort8(preprocessed) -> Cohort:
    """8 cases, seed 1: the evaluate, predict and trainer tests' cohort."""
    return preprocessed(8, 1)


@pytest.fixture(scope="session")
def cohort6(preprocessed) -> Cohort:
    """6 cases, seed 4, a fifth normal: the cohort the recipe training runs use."""
    return preprocessed(6, 4, normal_share=0.2)


@pytest.fixture(scope="session")
def cohort4(preprocessed) -> Cohort:
    """4 cases, seed 1: the entity extra's and the killed-evaluate tests' cohort."""
    return preprocessed(4, 1)
