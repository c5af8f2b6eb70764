"""Prompt and label-sentence text (``fvlm.prompts``): report-style zero-shot prompts written from a task's
catalog words (issue #14 item 4). The label sentences and template sets are tested with their users
(tests/fvlm/test_prompt_context.py, tests/fvlm/test_zeroshot.py)."""

from __future__ import annotations

import re

from anatomy.catalog import Prompts, load_anatomy_set, load_task_catalog, parse_task_catalog
from fvlm.prompts import report_nouns, report_prompts
from tests.anatomy.test_catalog import _task


def _nouns(catalog, task):
    return [(n.singular, n.plural, n.count) for n in report_nouns(load_task_catalog(catalog)[task])]


def test_report_nouns_pair_singular_and_plural_and_skip_adjectives_clauses_and_modifiers():
    assert _nouns("fvlm54", "lung_nodule")[0] == ("nodule", "nodules", True)
    assert _nouns("fvlm54", "pleural_effusion")[0] == ("pleural effusion", "pleural effusions", False)
    assert _nouns("fvlm54", "atelectasis")[0] == ("atelectasis", "atelectases", False)
    assert _nouns("fvlm54", "colonic_diverticulosis")[1] == ("diverticulum", "diverticula", True)
    assert _nouns("fvlm54", "degenerative_spine_changes")[0] == (None, "degenerative changes", False)
    assert _nouns("fvlm54", "hepatic_mass")[2] == ("mass", None, True)  # "A mass is observed."
    used = {w for n in _nouns("fvlm54", "emphysema") for w in n[:2] if w}
    assert "emphysematous" not in used and "bullous" not in used  # adjectives
    used = {w for n in _nouns("fvlm54", "ground_glass_opacity") for w in n[:2] if w}
    assert "ground glass" not in used and "ground-glass" not in used  # modifiers of "ground glass opacity"
    assert "ground glass opacity" in used
    used = {w for t in ("cardiomegaly", "hepatomegaly") for n in _nouns("fvlm54", t) for w in n[:2] if w}
    assert not any(re.search(r"\b(is|has)\b", w) for w in used)  # "liver is enlarged" is a clause
    assert all(len(_nouns(c, t.name)) <= 3 for c in ("fvlm54", "ct-rate") for t in load_task_catalog(c).tasks)


def test_prompt_nouns_replace_the_synonyms_in_report_prompts():
    assert _nouns("ct-rate", "lymphadenopathy") == [("lymphadenopathy", "lymphadenopathies", False),
                                                    ("enlarged lymph node", "enlarged lymph nodes", True)]
    assert "interlobular septa" not in {w for n in _nouns("ct-rate", "interlobular_septal_thickening") for w in n}


def test_report_prompts_fill_slots_and_place_the_finding_in_its_anatomy():
    data = {"name": "c", "tasks": [
        _task("lung_nodule", synonyms=["nodule", "nodules", "nodular"],
              phrasings=["A {size} mm nodule is seen in the {where} (granuloma?).", "A {side} nodule."]),
        _task("medical_material", anatomy=None, synonyms=["catheter"],
              phrasings=["A catheter is seen in the {where}.", "A catheter is seen."])]}
    c = parse_task_catalog(data, "c.yaml", load_anatomy_set("ct-rate4"))
    p = report_prompts(c["lung_nodule"], c.anatomy_set["lung"])
    assert isinstance(p, Prompts)
    assert p.positive == ("A 10 mm nodule is seen in the lung.", "A right nodule.", "A nodule is observed.",
                          "There is a nodule in the lung.")
    assert p.negative[:2] == ("No nodules are seen.", "No nodules were detected.")
    assert p.negative[2:] == ("The lung is normal.", "The lung is unremarkable.", "The lung is within normal limits.",
                              "No abnormality is seen in the lung.", "No pathology was detected in the lung.",
                              "The lung appears natural.")
    # a whole-study task: no {where} phrasing, no located sentence, no normal statement
    p = report_prompts(c["medical_material"])
    assert p.positive == ("A catheter is seen.", "A catheter is observed.")
    assert p.negative == ("No catheter is seen.", "No catheter was detected.")
