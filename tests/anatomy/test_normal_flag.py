"""The per-anatomy normal flag (``AnatomyReport.normal``): normal unless a sentence asserts, as present or hedged,
an abnormality, of the catalog or not; hand-written clauses and a synthetic cohort."""

from __future__ import annotations

import pytest

from anatomy.reports import ReportParser

PRESETS = ("fvlm15", "ct-rate")


@pytest.fixture(scope="module", params=PRESETS)
def parser(request: pytest.FixtureRequest) -> ReportParser:
    return ReportParser(request.param)


@pytest.fixture(scope="module")
def f15() -> ReportParser:
    return ReportParser("fvlm15")


@pytest.fixture(scope="module")
def ct() -> ReportParser:
    return ReportParser("ct-rate")


def flag(parser: ReportParser, text: str, anatomy: str) -> bool:
    a = parser.parse(text).anatomies[anatomy]
    assert a.mentioned, (anatomy, text)
    return a.normal


NORMAL = [
    # negated findings, catalog words or not
    ("lung", "No mass, nodule or active infiltration was detected in either lung. No nodules are seen."),
    ("lung", "Pleural effusion was not detected. No space-occupying lesion was seen in the lungs."),
    ("heart", "Heart contour and size are normal. Pericardial effusion was not observed."),
    # the abnormal word inside the negation cue
    ("esophagus", "The esophageal wall is not thickened."),
    ("aorta", "The thoracic aorta is not dilated."),
    # neutral sentences: technique, description, no abnormal word
    ("lung", "Trachea and both main bronchi are patent."),
    ("lung", "The examination was evaluated within the limits of an unenhanced scan. Both lungs were evaluated in "
             "the parenchymal window."),
    ("aorta", "Thoracic aorta diameter is normal."),
    ("esophagus", "Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected."),
    # a hypothetical or previous-study mention is no finding now
    ("lung", "Follow-up is recommended to exclude a lesion in the lungs."),
    ("lung", "In the previous examination there was a nodule in the right lung, which is not seen now."),
]

NOT_NORMAL = [
    # asserted catalog finding
    ("lung", "A 6 mm nodule is seen in the right upper lobe."),
    ("heart", "The heart is enlarged."),
    # hedged finding
    ("lung", "A nodule in the right lung cannot be excluded."),
    ("lung", "Possible small nodule in the left lower lobe."),
    # asserted abnormality outside the task catalog
    ("lung", "There is a 1 cm hypodense lesion in the lung."),
    ("lung", "Bronchial wall thickening is seen in both lungs."),
    ("lung", "Linear densities are seen in the lingula."),
    ("aorta", "The ascending aorta is 45 mm, wider than normal."),
    ("heart", "The right atrium is dilated."),
    ("esophagus", "The thoracic esophagus is dilated throughout."),
    ("esophagus", "Concentric thickening is observed in the thoracic esophagus wall."),
    # a hedged abnormality outside the catalog
    ("lung", "A small lesion in the left lung is suspected."),
]


@pytest.mark.parametrize(("anatomy", "text"), NORMAL)
def test_negated_neutral_and_not_current_texts_are_normal(parser: ReportParser, anatomy: str, text: str) -> None:
    assert flag(parser, text, anatomy), text


@pytest.mark.parametrize(("anatomy", "text"), NOT_NORMAL)
def test_asserted_or_hedged_abnormality_is_not_normal(parser: ReportParser, anatomy: str, text: str) -> None:
    assert not flag(parser, text, anatomy), text


def test_out_of_catalog_abnormality_leaves_labels_untouched(ct: ReportParser) -> None:
    """The flag reads abnormalities the 18 CT-RATE labels do not name; the labels stay those of the catalog."""
    for text in ("There is a 1 cm hypodense lesion in the lung.", "Bronchial wall thickening is seen in both lungs."):
        r = ct.parse(text)
        assert not any(r.anatomies["lung"].labels.values()), text
        assert not r.anatomies["lung"].normal, text


def test_hedged_finding_is_not_normal_under_either_uncertain_policy() -> None:
    text = "A nodule in the right lung cannot be excluded."
    for policy in ("positive", "negative"):
        r = ReportParser("ct-rate", uncertain=policy).parse(text)
        assert r.statuses["lung_nodule"] == "uncertain"
        assert r.labels["lung_nodule"] == (policy == "positive")
        assert not r.anatomies["lung"].normal, policy


def test_abnormality_placed_in_another_organ(f15: ReportParser, ct: ReportParser) -> None:
    r = f15.parse("The liver is diffusely hypodense compared to the spleen.")
    assert not r.anatomies["liver"].normal and r.anatomies["spleen"].normal
    r = f15.parse("Enlarged lymph nodes are seen in the hilar regions. Mediastinal and hilar lymph nodes are not "
                  "enlarged.")
    assert r.anatomies["lung"].mentioned and r.anatomies["lung"].normal
    r = ct.parse("The heart and the aorta are normal, and a hypodense lesion is seen in the liver.")
    assert r.anatomies["heart"].normal and r.anatomies["aorta"].normal


def test_attribute_words_are_abnormal_only_without_a_normal_cue(f15: ReportParser) -> None:
    assert flag(f15, "Liver size, contour and parenchymal density are normal.", "liver")
    assert flag(f15, "Spleen contour, size and parenchymal density are natural.", "spleen")
    assert flag(f15, "Vertebral body alignments and densities are normal.", "bone")
    assert not flag(f15, "Patchy densities are seen in the right lower lobe.", "lung")
    assert not flag(f15, "Vertebral heights are preserved but sclerotic densities are seen in the L2 vertebra.",
                    "bone")


def test_unmentioned_anatomy_stays_normal(parser: ReportParser) -> None:
    r = parser.parse("A 6 mm nodule is seen in the right upper lobe.")
    heart = r.anatomies["heart"]
    assert not heart.mentioned and heart.normal


# ------------------------------------------------------------------------------------------ synthetic cohort


def test_synthetic_cohort_flags() -> None:
    """On 200 synthetic reports (the project's report writer, label noise 0.1): a mentioned anatomy text that states
    no finding of the anatomy is flagged normal (>= 99 %), one that states a finding (present or hedged, label-noise
    mentions included, findings the noise left out of the report excluded) is not (<= 1 %)."""
    from benchmarks.normal_flag import synthetic_texts

    parser = ReportParser("fvlm15")
    free = free_normal = stated = stated_normal = spurious = 0
    for t in synthetic_texts(200, seed=11, label_noise=0.1):
        r = parser.parse(t.findings, impression=t.impression)
        for name, a in r.anatomies.items():
            if name in t.stated:
                stated += 1
                stated_normal += a.normal
            elif a.mentioned:
                free += 1
                free_normal += a.normal
        spurious += bool(t.spurious)
    assert free > 1000 and stated > 150 and spurious > 5
    assert free_normal / free >= 0.99, (free_normal, free)
    assert stated_normal / stated <= 0.01, (stated_normal, stated)
