"""Anatomy sets (configs/anatomy), task catalogs (configs/tasks) and the TotalSegmentator class map."""

from __future__ import annotations

import csv
import json
import re
import string
from pathlib import Path

import pytest
import yaml

from anatomy.catalog import (
    CatalogError,
    load_anatomy_set,
    load_task_catalog,
    parse_anatomy_set,
    parse_task_catalog,
)
from configs.paths import config_dir
from anatomy.totalseg import total_class_ids, total_classes

SHARED_DATA = Path(__file__).parents[2].parent / "shared/data"
CT_RATE_CSV = SHARED_DATA / "ct-rate/train.csv"
TOTALSEG_JSON = SHARED_DATA / "totalsegmentator/totalsegmentator_total_v2_class_map.json"

CT_RATE_TITLES = [
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]

CT_RATE_ANATOMY = {
    "Cardiomegaly": "heart",
    "Pericardial effusion": "heart",
    "Coronary artery wall calcification": "heart",
    "Hiatal hernia": "esophagus",
    "Arterial wall calcification": "aorta",
    "Medical material": None,
    "Lymphadenopathy": None,
}  # every other label: lung

FVLM54 = {
    "lung": ["lung_nodule", "lung_mass", "emphysema", "ground_glass_opacity", "consolidation", "atelectasis",
             "pleural_effusion", "bronchiectasis"],
    "heart": ["cardiomegaly", "pericardial_effusion", "coronary_artery_calcification"],
    "aorta": ["aortic_calcification", "aortic_aneurysm", "aortic_dissection"],
    "esophagus": ["hiatal_hernia", "esophageal_wall_thickening", "esophageal_dilatation"],
    "liver": ["hepatic_cyst", "hepatic_mass", "hepatomegaly", "hepatic_steatosis", "hepatic_calcification"],
    "gallbladder": ["cholelithiasis", "gallbladder_wall_thickening", "gallbladder_distension"],
    "spleen": ["splenomegaly", "splenic_lesion", "splenic_calcification"],
    "pancreas": ["pancreatic_lesion", "pancreatic_atrophy", "pancreatic_calcification", "pancreatic_duct_dilatation"],
    "kidney": ["renal_cyst", "nephrolithiasis", "hydronephrosis", "renal_mass", "renal_atrophy"],
    "adrenal_gland": ["adrenal_nodule", "adrenal_hyperplasia"],
    "stomach": ["gastric_wall_thickening", "gastric_distension"],
    "small_bowel": ["small_bowel_dilatation", "small_bowel_wall_thickening"],
    "colon": ["colonic_diverticulosis", "colonic_wall_thickening", "colonic_mass"],
    "urinary_bladder": ["bladder_wall_thickening", "bladder_stone", "prostatomegaly"],
    "bone": ["vertebral_compression_fracture", "degenerative_spine_changes", "lytic_bone_lesion",
             "sclerotic_bone_lesion", "osteopenia"],
}

SLOTS = {"where", "size", "side"}
DUMMY = {"where": "right upper lobe", "size": "12", "side": "left"}
CATALOGS = ["fvlm54", "ct-rate"]


def _all_tasks():
    return [(c, t) for c in CATALOGS for t in load_task_catalog(c).tasks]


TASKS = _all_tasks()
TASK_IDS = [f"{c}:{t.name}" for c, t in TASKS]


# ------------------------------------------------------------------------------------------ anatomy sets


def test_fvlm15_has_15_anatomies_labelled_in_file_order():
    s = load_anatomy_set("fvlm15")
    assert s.name == "fvlm15"
    assert len(s) == 15
    assert s.names == list(FVLM54)  # the task list above follows the set's order
    assert [a.label for a in s.anatomies] == list(range(1, 16))
    assert s["kidney"].classes == ("kidney_right", "kidney_left", "kidney_cyst_left", "kidney_cyst_right")
    assert "lung" in s and "brain" not in s
    assert s["adrenal_gland"].title == "Adrenal glands"
    assert s.description


def test_ct_rate4_matches_released_fvlm_anatomies():
    s = load_anatomy_set("ct-rate4")
    assert s.names == ["lung", "heart", "esophagus", "aorta"]
    assert set(s["lung"].classes) == {
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
    }
    assert s["heart"].classes == ("heart", "atrial_appendage_left")
    assert s["esophagus"].classes == ("esophagus",)
    assert s["aorta"].classes == ("aorta",)
    ids = total_class_ids()
    lut = s.total_id_to_label()
    assert len(lut) == 9
    assert {lut[ids[c]] for c in s["lung"].classes} == {1}
    assert lut[ids["aorta"]] == 4
    assert ids["trachea"] not in lut


@pytest.mark.parametrize("name", ["fvlm15", "ct-rate4"])
def test_anatomy_sets_are_consistent(name):
    s = load_anatomy_set(name)
    known = total_class_ids()
    owner = s.class_to_anatomy()
    assert sum(len(a.classes) for a in s.anatomies) == len(owner)  # no class grouped twice
    assert set(owner) <= set(known)
    for a in s.anatomies:
        assert a.synonyms and all(syn == syn.lower() for syn in a.synonyms)
    # a preset name and its path give the same set
    assert load_anatomy_set(config_dir() / "anatomy" / f"{name}.yaml").names == s.names


def test_every_class_belongs_to_at_most_one_fvlm15_anatomy_and_none_is_unknown():
    owner = load_anatomy_set("fvlm15").class_to_anatomy()
    assert owner["lung_middle_lobe_right"] == "lung"
    assert owner["prostate"] == "urinary_bladder"
    assert owner["duodenum"] == "small_bowel"
    assert "brain" not in owner and "femur_left" not in owner


# ------------------------------------------------------------------------------------------ task catalogs


def test_fvlm54_has_54_tasks_over_all_15_anatomies():
    c = load_task_catalog("fvlm54")
    assert c.name == "fvlm54"
    assert c.anatomy_set.name == "fvlm15"
    assert len(c) == 54
    assert c.names == [n for names in FVLM54.values() for n in names]
    groups = c.by_anatomy()
    assert list(groups) == c.anatomy_set.names  # no whole-study task
    for anatomy, names in FVLM54.items():
        assert [t.name for t in groups[anatomy]] == names
        assert len(groups[anatomy]) >= 2, anatomy
    assert c["lung_nodule"].title == "Lung nodule"
    assert c["cholelithiasis"].anatomy == "gallbladder"


def test_ct_rate_catalog_titles_and_anatomies():
    c = load_task_catalog("ct-rate")
    assert c.anatomy_set.name == "ct-rate4"
    assert [t.title for t in c.tasks] == CT_RATE_TITLES
    for t in c.tasks:
        assert t.name == t.title.lower().replace(" ", "_")
        assert t.anatomy == CT_RATE_ANATOMY.get(t.title, "lung"), t.title
    groups = c.by_anatomy()
    assert [t.title for t in groups[None]] == ["Medical material", "Lymphadenopathy"]
    assert len(groups["lung"]) == 11
    assert sum(t.anatomy is not None for t in c.tasks) == 16


def test_ct_rate_titles_equal_train_csv_columns():
    if not CT_RATE_CSV.is_file():
        pytest.skip(f"CT-RATE label table {CT_RATE_CSV} not present (shared data not mounted)")
    with open(CT_RATE_CSV, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    labels = [h for h in header if h not in ("AccessionNo", "VolumeName", "report_text")]
    assert [t.title for t in load_task_catalog("ct-rate").tasks] == labels


@pytest.mark.parametrize("catalog", CATALOGS)
def test_titles_unique_and_names_snake_case(catalog):
    c = load_task_catalog(catalog)
    titles = [t.title for t in c.tasks]
    assert len(set(titles)) == len(titles)
    assert len(set(c.names)) == len(c.names)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in c.names)
    assert c.description


@pytest.mark.parametrize(("catalog", "task"), TASKS, ids=TASK_IDS)
def test_synonyms(catalog, task):
    assert 4 <= len(task.synonyms) <= 10, task.synonyms
    assert len(set(task.synonyms)) == len(task.synonyms)
    for s in task.synonyms:
        assert s == s.lower() and s == s.strip() and "  " not in s, s


@pytest.mark.parametrize("catalog", CATALOGS)
def test_synonyms_distinct_between_tasks_of_one_anatomy(catalog):
    """No synonym of one task occurs as a whole word inside a synonym of another task of the same anatomy."""
    for anatomy, tasks in load_task_catalog(catalog).by_anatomy().items():
        for t in tasks:
            for u in tasks:
                if t is u:
                    continue
                for s in t.synonyms:
                    pattern = re.compile(rf"\b{re.escape(s)}\b")
                    clash = [v for v in u.synonyms if pattern.search(v)]
                    assert not clash, f"{catalog}/{anatomy}: {t.name} {s!r} also matches {u.name} {clash}"


@pytest.mark.parametrize(("catalog", "task"), TASKS, ids=TASK_IDS)
def test_phrasings_use_only_allowed_slots(catalog, task):
    assert 3 <= len(task.phrasings) <= 6
    for p in task.phrasings:
        fields = {f for _, f, spec, conv in string.Formatter().parse(p) if f is not None}
        assert fields <= SLOTS, f"{p!r} uses {fields - SLOTS}"
        text = p.format(**DUMMY)
        assert "{" not in text and "}" not in text
        assert text[0].isupper() and text.endswith((".", ")")), text
    if any("{size}" in p for p in task.phrasings):
        assert any(w in task.name for w in ("nodule", "mass", "cyst", "lithiasis", "stone", "lesion", "aneurysm",
                                            "lymphadenopathy")), f"{task.name} has no size"


@pytest.mark.parametrize(("catalog", "task"), TASKS, ids=TASK_IDS)
def test_prompts_paired_in_release_and_ct_clip_styles(catalog, task):
    pos, neg = task.prompts.positive, task.prompts.negative
    assert pos and len(pos) == len(neg)
    assert all(p.strip() for p in pos + neg)
    assert len(set(pos) | set(neg)) == len(pos) + len(neg)  # a prompt is never both
    assert f"{task.title}." in pos and f"Not {task.title.lower()}." in neg  # fVLM release
    assert f"{task.title} is present." in pos and f"{task.title} is not present." in neg  # CT-CLIP
    i = pos.index(f"{task.title}.")
    assert neg[i] == f"Not {task.title.lower()}."  # pairs share an index
    assert len(pos) >= 3  # plus at least one natural sentence


# ------------------------------------------------------------------------------- TotalSegmentator classes


def test_total_yaml_has_117_classes():
    classes = total_classes()
    assert sorted(classes) == list(range(1, 118))
    assert classes[1] == "spleen" and classes[117] == "costal_cartilages"


def test_total_yaml_matches_shared_class_map():
    if not TOTALSEG_JSON.is_file():
        pytest.skip(f"shared TotalSegmentator class map {TOTALSEG_JSON} not present")
    shared = {int(k): v for k, v in json.loads(TOTALSEG_JSON.read_text())["total"].items()}
    assert total_classes() == shared


def test_total_yaml_matches_installed_totalsegmentator():
    map_to_binary = pytest.importorskip("totalsegmentator.map_to_binary")
    assert total_classes() == {int(k): v for k, v in map_to_binary.class_map["total"].items()}


# ------------------------------------------------------------------------------------------- error cases


def _set(*anatomies):
    return {"name": "t", "anatomies": list(anatomies)}


def _anat(name, classes, synonyms=("x",)):
    return {"name": name, "classes": list(classes), "synonyms": list(synonyms)}


def _task(name, anatomy="lung", **extra):
    entry = {
        "name": name,
        "title": name.replace("_", " ").capitalize(),
        "anatomy": anatomy,
        "synonyms": [name.replace("_", " ")],
        "phrasings": ["There is a finding in the {where}."],
        "prompts": {"positive": ["Finding."], "negative": ["Not finding."]},
    }
    entry.update(extra)
    return entry


def test_unknown_class_names_source_anatomy_and_class():
    data = _set(_anat("lung", ["lung_upper_lobe_left"]), _anat("heart", ["hart"]))
    with pytest.raises(CatalogError, match=r"my\.yaml: anatomy 'heart': unknown TotalSegmentator class 'hart'"):
        parse_anatomy_set(data, "my.yaml")


def test_class_grouped_twice():
    data = _set(_anat("lung", ["lung_upper_lobe_left", "trachea"]), _anat("airway", ["trachea"]))
    with pytest.raises(CatalogError, match=r"anatomy 'airway': class 'trachea' is already grouped into .*'lung'"):
        parse_anatomy_set(data, "s.yaml")


def test_duplicate_anatomy():
    data = _set(_anat("lung", ["lung_upper_lobe_left"]), _anat("lung", ["lung_lower_lobe_left"]))
    with pytest.raises(CatalogError, match=r"s\.yaml: duplicate anatomy 'lung'"):
        parse_anatomy_set(data, "s.yaml")


def test_anatomy_missing_field_and_bad_name():
    entry = _anat("lung", ["lung_upper_lobe_left"])
    del entry["synonyms"]
    with pytest.raises(CatalogError, match=r"anatomy 'lung': missing field 'synonyms'"):
        parse_anatomy_set(_set(entry), "s.yaml")
    with pytest.raises(CatalogError, match=r"name 'Lung' must be lower snake case"):
        parse_anatomy_set(_set(_anat("Lung", ["lung_upper_lobe_left"])), "s.yaml")
    with pytest.raises(CatalogError, match=r"s\.yaml: missing field 'anatomies'"):
        parse_anatomy_set({"name": "t"}, "s.yaml")


def test_duplicate_task():
    data = {"name": "c", "tasks": [_task("lung_nodule"), _task("lung_nodule")]}
    with pytest.raises(CatalogError, match=r"c\.yaml: duplicate task 'lung_nodule'"):
        parse_task_catalog(data, "c.yaml", load_anatomy_set("ct-rate4"))


def test_duplicate_task_title():
    data = {"name": "c", "tasks": [_task("a_b"), _task("a_c", title="A b")]}
    with pytest.raises(CatalogError, match=r"duplicate task titles \['A b'\]"):
        parse_task_catalog(data, "c.yaml", load_anatomy_set("ct-rate4"))


def test_task_with_unknown_anatomy():
    data = {"name": "c", "tasks": [_task("hepatic_cyst", anatomy="liver")]}
    with pytest.raises(CatalogError, match=r"task 'hepatic_cyst': anatomy 'liver' is not in anatomy set 'ct-rate4'"):
        parse_task_catalog(data, "c.yaml", load_anatomy_set("ct-rate4"))


def test_task_missing_fields():
    entry = _task("lung_nodule")
    del entry["prompts"]
    with pytest.raises(CatalogError, match=r"c\.yaml: task 'lung_nodule': missing field 'prompts'"):
        parse_task_catalog({"name": "c", "tasks": [entry]}, "c.yaml", load_anatomy_set("ct-rate4"))
    entry = _task("lung_nodule", prompts={"positive": ["Lung nodule."]})
    with pytest.raises(CatalogError, match=r"task 'lung_nodule' prompts: missing field 'negative'"):
        parse_task_catalog({"name": "c", "tasks": [entry]}, "c.yaml", load_anatomy_set("ct-rate4"))
    with pytest.raises(CatalogError, match=r"c\.yaml: missing field 'anatomy_set'"):
        parse_task_catalog({"name": "c", "tasks": [_task("x")]}, "c.yaml")


def test_task_null_anatomy_is_whole_study():
    c = parse_task_catalog({"name": "c", "tasks": [_task("medical_material", anatomy=None)]}, "c.yaml",
                           load_anatomy_set("ct-rate4"))
    assert c["medical_material"].anatomy is None
    assert [t.name for t in c.by_anatomy()[None]] == ["medical_material"]


def test_files_unknown_class_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_set(_anat("heart", ["heart", "hart"]))))
    with pytest.raises(CatalogError, match=rf"{re.escape(str(path))}: anatomy 'heart': unknown .* class 'hart'"):
        load_anatomy_set(path)


def test_files_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nanatomies: [unclosed\n")
    with pytest.raises(CatalogError, match=rf"{re.escape(str(path))}: not valid YAML"):
        load_anatomy_set(path)
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(CatalogError, match=r"expected a mapping at the top level"):
        load_task_catalog(path)


def test_files_task_catalog_by_path(tmp_path):
    good = {"name": "mine", "anatomy_set": "ct-rate4", "tasks": [_task("lung_nodule"), _task("cardiomegaly", "heart")]}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(good))
    c = load_task_catalog(path)
    assert c.names == ["lung_nodule", "cardiomegaly"] and c.anatomy_set.name == "ct-rate4"
    bad = dict(good, tasks=[_task("lung_nodule"), _task("renal_cyst", "kidney")])
    path = tmp_path / "bad_tasks.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(CatalogError, match=rf"{re.escape(str(path))}: task 'renal_cyst': anatomy 'kidney'"):
        load_task_catalog(path)
    missing = dict(good, tasks=[{k: v for k, v in _task("lung_nodule").items() if k != "title"}])
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(missing))
    with pytest.raises(CatalogError, match=r"task 'lung_nodule': missing field 'title'"):
        load_task_catalog(path)


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"unknown anatomy preset 'fvlm16'; presets: .*ct-rate4.*fvlm15"):
        load_anatomy_set("fvlm16")
    with pytest.raises(FileNotFoundError, match=r"unknown tasks preset 'ctrate'; presets: .*ct-rate.*fvlm54"):
        load_task_catalog("ctrate")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_anatomy_set(tmp_path / "absent.yaml")


# ------------------------------------------------------------------ structured prompt fields (issue 8, part 2)


@pytest.mark.parametrize("name, count", [("fvlm54", 54), ("ct-rate", 18)])
def test_every_shipped_task_has_the_four_structured_sentences(name, count):
    from anatomy.catalog import STRUCTURED_FIELDS

    catalog = load_task_catalog(name)
    assert len(catalog) == count
    for t in catalog.tasks:
        for field in STRUCTURED_FIELDS:
            text = getattr(t.structured, field)
            assert text and text.endswith(".") and len(text.split()) <= 25, (t.name, field, text)
        assert t.structured.verdict == f"{t.title} is present."
    emph = load_task_catalog("fvlm54")["emphysema"].structured
    assert emph.definition == "Emphysema is permanent enlargement of the airspaces with destruction of alveolar walls."
    assert emph.sentences(("appearance", "verdict")) == ("Low-attenuation areas without walls in the lung.",
                                                          "Emphysema is present.")


def test_structured_fields_are_optional_and_parsed():
    data = {"name": "c", "tasks": [_task("lung_nodule", definition="A  small\nround opacity.", verdict="Nodule."),
                                   _task("emphysema")]}
    c = parse_task_catalog(data, "c.yaml", load_anatomy_set("ct-rate4"))
    st = c["lung_nodule"].structured
    assert (st.definition, st.appearance, st.observation, st.verdict) == ("A small round opacity.", "", "", "Nodule.")
    assert st and not c["emphysema"].structured and c["emphysema"].structured.sentences() == ()


@pytest.mark.parametrize("field, value, words", [
    ("appearance", ["a", "list"], "field 'appearance' must be a string (one sentence), got list"),
    ("verdict", 3, "field 'verdict' must be a string (one sentence), got int"),
    ("observation", "   ", "field 'observation' is empty"),
])
def test_structured_field_errors_name_file_task_and_field(field, value, words):
    data = {"name": "c", "tasks": [_task("lung_nodule", **{field: value})]}
    with pytest.raises(CatalogError) as e:
        parse_task_catalog(data, "c.yaml", load_anatomy_set("ct-rate4"))
    assert str(e.value).startswith("c.yaml: task 'lung_nodule': ") and words in str(e.value)


def test_prompt_nouns_are_parsed_lower_case_and_checked():
    """The optional ``prompt_nouns`` of a task (used by ``fvlm.prompts.report_nouns``, tests/fvlm/test_prompts.py)."""
    data = {"name": "c", "tasks": [_task("lung_nodule", prompt_nouns=["Nodule", "nodules"]), _task("emphysema")]}
    c = parse_task_catalog(data, "c.yaml", load_anatomy_set("ct-rate4"))
    assert c["lung_nodule"].prompt_nouns == ("nodule", "nodules") and c["emphysema"].prompt_nouns == ()
    with pytest.raises(CatalogError, match=r"c\.yaml: task 'lung_nodule': field 'prompt_nouns' holds 3"):
        parse_task_catalog({"name": "c", "tasks": [_task("lung_nodule", prompt_nouns=[3])]}, "c.yaml",
                           load_anatomy_set("ct-rate4"))
