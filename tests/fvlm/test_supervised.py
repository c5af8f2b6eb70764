"""Supervised ceiling: the ``task_classifier`` head, the ``supervised`` objective, ``supervised_scores``, the
``task_label_mask`` dataset extra. The ``supervised`` recipe end to end (3 CPU steps through ``fvlm train``):
tests/pipelines/train/test_recipes.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm.losses import create_objective, list_objectives
from fvlm.model import create_model, load_pretrained, read_config, save_pretrained, train_wordpiece
from fvlm.model.heads import data_extras_for, list_heads
from fvlm.model.heads.classifier import task_id
from fvlm.supervised import supervised_scores

A, L = 15, 6
SHAPE = (32, 64, 64)
HEAD = {"task_classifier": {"catalog": "fvlm54"}}


def _model(seed: int = 0, **options):
    torch.manual_seed(seed)
    return create_model("tiny", text={"vocab_size": 100}, heads={"task_classifier": {"catalog": "fvlm54", **options}})


def _anatomy() -> torch.Tensor:
    """(Z, Y, X): the 4 x 4 x 4 token cells of the tiny grid labelled 0..15 in turn, each anatomy 4 cells."""
    z = torch.arange(SHAPE[0]).view(-1, 1, 1) * 4 // SHAPE[0]
    y = torch.arange(SHAPE[1]).view(1, -1, 1) * 4 // SHAPE[1]
    x = torch.arange(SHAPE[2]).view(1, 1, -1) * 4 // SHAPE[2]
    return ((z * 16 + y * 4 + x) % (A + 1)).expand(*SHAPE).clone()


def _batch(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 1, *SHAPE, generator=g), "anatomy": _anatomy().expand(b, *SHAPE).clone(),
            "input_ids": torch.randint(5, 100, (b, A, L), generator=g),
            "attention_mask": torch.ones(b, A, L, dtype=torch.long)}


# ------------------------------------------------------------------------------------------------ the head


def test_the_head_resolves_the_catalog_and_writes_it_into_the_config() -> None:
    assert "task_classifier" in list_heads() and "supervised" in list_objectives()
    model = _model()
    head = model.heads["task_classifier"]
    assert head.anatomies[:3] == ["lung", "heart", "aorta"] and head.num_tasks == 8  # lung has 8 tasks
    assert sum(len(r) for r in head.task_names) == 54 and int(head.task_mask.sum()) == 54
    assert head.index("lung_nodule") == (0, 0) and head.index("cardiomegaly") == (1, 0) and head.index("x") is None
    entry = model.config.heads["task_classifier"]
    assert entry["anatomies"] == head.anatomies and entry["tasks"]["lung"][0] == "lung_nodule"
    assert data_extras_for(model.config) == ("task_label_mask",) == model.data_extras
    out = model(**_batch(2))
    assert out["task_logits"].shape == (2, A, 8) and out["task_mask"].shape == (A, 8)
    assert out["task_ids"][0, 0] == task_id("lung_nodule") and out["task_ids"][1, 3] == 0  # heart: 3 tasks
    (out["task_logits"] * out["task_mask"]).sum().backward()
    assert head.fc.weight.grad is not None and model.pooling.query.grad is not None  # reaches the image tower
    assert next(model.text.parameters()).grad is None  # the text tower is not trained by the head


def test_explicit_tasks_a_hidden_layer_and_the_same_logits_from_the_resolved_config() -> None:
    tasks = {"lung": ["emphysema", "lung_nodule"], "liver": ["liver_lesion"]}
    names = [f"a{i}" for i in range(A - 2)] + ["lung", "liver"]
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": 100},
                         heads={"task_classifier": {"tasks": tasks, "anatomies": names, "hidden": 16}})
    head = model.heads["task_classifier"]
    assert head.num_tasks == 2 and head.index("liver_lesion") == (14, 0) and int(head.task_mask.sum()) == 3
    assert model(**_batch(2))["task_logits"].shape == (2, A, 2)
    again = create_model(model.config)  # the resolved config builds the same head
    assert again.heads["task_classifier"].task_names == head.task_names


@pytest.mark.parametrize("options, words", [
    ({}, "give `catalog`"), ({"catalog": "fvlm54", "hidden": -1}, "hidden"),
    ({"catalog": "fvlm54", "dropout": 1.0}, "dropout"), ({"tasks": {"lung": ["x"]}}, "name the anatomies"),
    ({"tasks": {"lungs": ["x"]}, "anatomies": [f"a{i}" for i in range(A)]}, "anatomies the model lacks: lungs"),
    ({"tasks": {"a0": ["x"], "a1": ["x"]}, "anatomies": [f"a{i}" for i in range(A)]}, "more than once: x"),
    ({"tasks": {"a0": ["x"]}, "anatomies": ["a0"]}, "1 anatomy names"),
    ({"catalog": "fvlm54", "colour": 1}, "colour"),
])
def test_bad_head_options_are_errors(options: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        create_model("tiny", heads={"task_classifier": options})


# ------------------------------------------------------------------------------------------- the objective


def _inputs(seed: int = 0, b: int = 3, a: int = 4, k: int = 3, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    task_mask = torch.ones(a, k, dtype=torch.bool)
    task_mask[1, 2:] = False  # anatomy 1 has 2 tasks
    task_mask[3, 1:] = False  # anatomy 3 has 1
    anatomy_mask = torch.ones(b, a, dtype=torch.bool)
    anatomy_mask[0, 2] = anatomy_mask[2, 0] = False
    known = torch.ones(b, a, k, dtype=torch.bool)
    known[1, 0, 1] = False
    return {"task_logits": torch.randn(b, a, k, generator=g, dtype=dtype).requires_grad_(),
            "task_mask": task_mask, "anatomy_mask": anatomy_mask,
            "anatomy_labels": (torch.rand(b, a, k, generator=g) < 0.4).to(dtype) * task_mask,
            "anatomy_label_known": known}


def _valid(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return x["anatomy_mask"].unsqueeze(-1) & x["task_mask"] & x["anatomy_label_known"]


def test_the_loss_ignores_masked_anatomies_padding_columns_and_unknown_labels() -> None:
    obj = create_objective("supervised")
    x = _inputs()
    base = obj(**x)["supervised"]
    base.backward()
    valid = _valid(x)
    grad = x["task_logits"].grad
    assert torch.all(grad[~valid] == 0) and torch.all(grad[valid] != 0)
    y = _inputs()
    with torch.no_grad():  # anything in the invalid cells, NaN included
        junk = torch.where(valid, y["task_logits"], torch.full_like(y["task_logits"], float("nan")))
    y["task_logits"] = junk.requires_grad_()
    y["anatomy_labels"] = torch.where(valid, y["anatomy_labels"], torch.full_like(y["anatomy_labels"], 7.0))
    changed = obj(**y)["supervised"]
    assert changed.item() == base.item()
    changed.backward()
    assert torch.isfinite(y["task_logits"].grad).all()
    z = _inputs()
    with torch.no_grad():
        z["task_logits"][1, 1, 0] += 1.0  # a valid cell does change it
    assert obj(**z)["supervised"].item() != base.item()


def test_the_loss_is_the_mean_bce_of_the_valid_cells_by_hand() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0]], [[-0.5, 1.5], [4.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    task_mask = torch.tensor([[True, True], [True, False]])  # anatomy 1 has one task
    anatomy_mask = torch.tensor([[True, True], [True, False]])  # anatomy 1 masked in sample 1
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    cells = [(2.0, 1), (-1.0, 0), (0.5, 0), (-0.5, 1), (1.5, 1)]  # the valid (logit, label) cells
    bce = [-(y * math.log(sig(z)) + (1 - y) * math.log(1 - sig(z))) for z, y in cells]
    got = create_objective("supervised")(task_logits=logits, task_mask=task_mask, anatomy_mask=anatomy_mask,
                                         anatomy_labels=labels)["supervised"]
    assert got.item() == pytest.approx(sum(bce) / 5, abs=1e-12)
    # pos_weight: every positive term times rho; "batch": rho per column = negatives / positives (>= 1)
    pw = [(3.0 if y else 1.0) * v for (_, y), v in zip(cells, bce)]
    got = create_objective("supervised", pos_weight=3.0)(task_logits=logits, task_mask=task_mask,
                                                         anatomy_mask=anatomy_mask, anatomy_labels=labels)
    assert got["supervised"].item() == pytest.approx(sum(pw) / 5, abs=1e-12)
    # "batch": a third sample with no positive; column (0, 0) then holds 1 positive and 2 negatives -> rho 2,
    # columns (0, 1) and (1, 0) no positive -> 1
    logits3 = torch.cat([logits, torch.ones(1, 2, 2, dtype=torch.float64)])
    labels3 = torch.zeros(3, 2, 2, dtype=torch.float64)
    labels3[0, 0, 0] = 1.0
    amask3 = torch.cat([anatomy_mask, torch.tensor([[True, False]])])
    cells3 = [(2.0, 1, 2.0), (-1.0, 0, 1.0), (0.5, 0, 1.0), (-0.5, 0, 1.0), (1.5, 0, 1.0), (1.0, 0, 1.0), (1.0, 0, 1.0)]
    want = [-(r * y * math.log(sig(z)) + (1 - y) * math.log(1 - sig(z))) for z, y, r in cells3]
    got = create_objective("supervised", pos_weight="batch")(task_logits=logits3, task_mask=task_mask,
                                                             anatomy_mask=amask3, anatomy_labels=labels3)
    assert got["supervised"].item() == pytest.approx(sum(want) / 7, abs=1e-12)


def test_nothing_valid_gives_a_zero_with_a_graph() -> None:
    x = _inputs()
    x["anatomy_mask"] = torch.zeros_like(x["anatomy_mask"])
    value = create_objective("supervised", pos_weight="batch")(**x)["supervised"]
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.all(x["task_logits"].grad == 0)


def test_columns_of_another_catalog_and_missing_head_outputs_are_errors() -> None:
    obj = create_objective("supervised")
    x = _inputs()
    ids = torch.arange(1, 13).view(4, 3) * (x["task_mask"])
    data_ids = ids.expand(3, 4, 3).clone()
    obj(**x, task_ids=ids, anatomy_task_ids=data_ids)  # the same columns: fine
    data_ids[:, 1, 0] = 99
    with pytest.raises(ValueError, match=r"differ from the data's anatomy_labels columns in anatomy row\(s\) \[1\]"):
        obj(**x, task_ids=ids, anatomy_task_ids=data_ids)
    with pytest.raises(ValueError, match="another task list per anatomy"):
        obj(**{**x, "anatomy_labels": x["anatomy_labels"][..., :2]})
    with pytest.raises(ValueError, match="add the task_classifier head"):
        obj(anatomy_mask=x["anatomy_mask"], anatomy_labels=x["anatomy_labels"])
    for bad in ("mean", 0, -1.0, True):
        with pytest.raises(ValueError, match="pos_weight"):
            create_objective("supervised", pos_weight=bad)


# -------------------------------------------------------------------------------------------- the scores


def test_scores_are_the_logits_with_nan_where_masked_or_unknown() -> None:
    model = _model().eval()
    x = _batch(3)
    cut = torch.zeros(3, A, dtype=torch.bool)
    cut[1, 0] = True  # the lung of case 1 is cut
    names = ["lung_nodule", "cardiomegaly", "whole_body_thing", "emphysema"]
    scores = supervised_scores(model, x["image"], x["anatomy"], cut, names)
    assert scores.shape == (3, 4) and scores.dtype == np.float64
    with torch.no_grad():
        z = model(**x, cut=cut)["task_logits"]
    assert scores[0, 0] == pytest.approx(float(z[0, 0, 0])) and scores[2, 3] == pytest.approx(float(z[2, 0, 2]))
    assert np.isnan(scores[1, 0]) and np.isnan(scores[1, 3]) and not np.isnan(scores[1, 1])
    assert np.isnan(scores[:, 2]).all()  # no logit for that task
    probs = supervised_scores(model, x["image"], x["anatomy"], cut, names, probability=True)
    assert np.allclose(probs[0, 0], 1 / (1 + np.exp(-scores[0, 0])))
    with pytest.raises(ValueError, match="task_classifier head.*this model's heads: none"):
        supervised_scores(create_model("tiny", text={"vocab_size": 100}), x["image"], x["anatomy"], None, names)


@pytest.mark.slow  # trains a tiny model for a few steps
def test_a_few_steps_on_a_planted_label_drive_the_training_auc_up() -> None:
    """lung_nodule is positive exactly when the lung (anatomy 1) is bright; 10 Adam steps on 8 cases."""
    from sklearn.metrics import roc_auc_score

    model = _model(seed=1)
    b = 8
    x = _batch(b, seed=2)
    x["image"] = 0.3 + 0.2 * x["image"]
    positive = torch.arange(b) % 2 == 0
    lung = (x["anatomy"] == 1).unsqueeze(1)  # (B, 1, Z, Y, X)
    x["image"] = torch.where(lung & positive.view(b, 1, 1, 1, 1), x["image"] + 0.4, x["image"])
    labels = torch.zeros(b, A, 8)
    labels[:, 0, 0] = positive.float()
    obj = create_objective("supervised")

    def auc() -> float:
        model.eval()
        s = supervised_scores(model, x["image"], x["anatomy"], None, ["lung_nodule"])[:, 0]
        model.train()
        return roc_auc_score(positive.numpy(), s)

    before = auc()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(10):
        opt.zero_grad()
        loss = obj(**model(**x), anatomy_labels=labels)["supervised"]
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    after = auc()
    assert after == 1.0 and after > before, (before, after)
    assert loss.item() < 0.5 * first


def test_the_export_keeps_the_head_and_the_scores(tmp_path: Path) -> None:
    tok = train_wordpiece(["mild cardiomegaly", "no effusion"], vocab_size=120, min_frequency=1, max_length=16)
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": len(tok)}, heads=HEAD).eval()
    with torch.no_grad():
        model.heads["task_classifier"].fc.bias.normal_()  # a "trained" value, not the init
    out = save_pretrained(model, tok, tmp_path / "export")
    saved = json.loads((out / "config.json").read_text())["config"]["heads"]["task_classifier"]
    assert saved["tasks"]["lung"][:2] == ["lung_nodule", "lung_mass"] and saved["anatomies"][0] == "lung"
    assert read_config(out) == model.config
    # the export names its tasks itself: a catalog that is gone does not matter
    doc = json.loads((out / "config.json").read_text())
    doc["config"]["heads"]["task_classifier"]["catalog"] = str(tmp_path / "gone.yaml")
    (out / "config.json").write_text(json.dumps(doc))
    loaded, _ = load_pretrained(out)
    x = _batch(2, seed=3)
    names = ["lung_nodule", "liver_lesion", "cardiomegaly"]
    a = supervised_scores(model, x["image"], x["anatomy"], None, names)
    b = supervised_scores(loaded, x["image"], x["anatomy"], None, names)
    assert np.array_equal(a, b, equal_nan=True) and not np.isnan(a).all()
    assert loaded.heads["task_classifier"].task_names == model.heads["task_classifier"].task_names


# ------------------------------------------------ the dataset extra and the recipe on CPU (real cohort)


@pytest.fixture(scope="module")
def prepared(cohort6) -> Path:
    return cohort6.prep


@pytest.mark.slow  # preprocesses the 6-case cohort
def test_the_extra_marks_known_labels_and_names_the_columns(prepared: Path) -> None:
    from pipelines.cases.dataset import CaseDataset
    from pipelines.train.extras.tasks import known_labels

    tok = train_wordpiece(["lung normal"] * 4, vocab_size=60, min_frequency=1)
    ds = CaseDataset(prepared, tok, crop_size_zyx=SHAPE, mode="resize", train=False, max_text_len=16,
                     extras=("task_label_mask",))
    head = _model().heads["task_classifier"]
    sample = ds[0]
    assert torch.equal(sample["anatomy_task_ids"], head.task_ids)  # fvlm15 preset -> the fvlm54 columns
    assert torch.equal(sample["anatomy_label_known"], head.task_mask)  # a parsed report states every task
    # a label-only case: an empty ground-truth cell is unknown, a stated one known
    ds.allow_label_only = True
    known = known_labels(ds, {"labels": {"Lung nodule": 1, "emphysema": None, "cardiomegaly": 0}})
    assert known[0, 0] and not known[0, 2] and known[1, 0] and known.sum() == 2


# ------------------------------------------------------------------------------------- the text-free step


def test_a_text_free_forward_gives_the_same_logits_without_running_the_text_tower(monkeypatch) -> None:
    model = _model().eval()
    x = _batch(2)
    with torch.no_grad():
        full = model(**x)
        monkeypatch.setattr(model.text, "forward", lambda *a, **k: pytest.fail("the text tower ran"))
        free = model(x["image"], x["anatomy"], None, None)
    assert free["text_emb"] is None and free["global_text_emb"] is None
    assert set(free) == set(full)
    torch.testing.assert_close(free["task_logits"], full["task_logits"])
    torch.testing.assert_close(free["image_emb"], full["image_emb"])


def test_a_text_free_forward_is_refused_where_a_head_reads_text() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": 100},
                         heads={**HEAD, "uncertainty": {}}).eval()
    x = _batch(1)
    with pytest.raises(ValueError, match="uncertainty"):
        model(x["image"], x["anatomy"], None, None)
    with pytest.raises(ValueError, match="both input_ids and attention_mask"):
        model(x["image"], x["anatomy"], x["input_ids"], None)


def test_the_trainer_runs_the_text_tower_only_where_an_objective_or_head_reads_text() -> None:
    from pipelines.train.trainer import reads_text

    supervised = create_objective("supervised", pos_weight="batch")
    assert not reads_text([supervised], _model())
    assert reads_text([supervised, create_objective("anatomy_contrastive")], _model())
    torch.manual_seed(0)
    reading = create_model("tiny", text={"vocab_size": 100}, heads={**HEAD, "uncertainty": {}})
    assert reads_text([supervised], reading)
