"""Training recipes: every preset loads, bad fields fail naming the field, overrides, the LR schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from configs.paths import config_dir
from pipelines.config.recipe import RecipeError, TrainConfig, load_recipe
from pipelines.train.engine import deepspeed_config, lr_lambda

PRESETS = sorted(p.stem for p in (config_dir() / "train").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_recipe_loads_and_round_trips(name: str) -> None:
    cfg = load_recipe(name)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_and_their_objectives() -> None:
    assert {"clip", "fvlm-plain", "fvlm", "fvlm-disease", "tiny"} <= set(PRESETS)
    objectives = {n: [o.name for o in load_recipe(n).objectives] for n in PRESETS}
    assert objectives["clip"] == ["clip_global"] and objectives["fvlm-plain"] == ["anatomy_infonce"]
    assert objectives["fvlm"] == ["anatomy_contrastive"] and objectives["fvlm-disease"] == ["disease_aware"]
    base = load_recipe("fvlm")
    assert (base.data.crop_size, base.data.batch_size, base.optim.lr, base.optim.weight_decay, base.optim.epochs) == (
        (112, 256, 352), 14, 1e-4, 0.05, 20)


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "optim.lrr"), ("data.mode=zoom", "data.mode"), ("optim.lr=-1", "optim.lr"),
    ("checkpoint.every=0", "checkpoint.every"), ("data.crop_size=[1,2]", "data.crop_size"),
    ("bogus=1", "bogus"),
])
def test_a_bad_field_is_named_in_the_error(override: str, field: str) -> None:
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        load_recipe("tiny", [override])


def test_unknown_objective_lists_the_registered_ones(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("objectives: [{name: nope}]\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: .*unknown objective 'nope'.*clip_global"):
        load_recipe(path)


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_recipe("tiny", ["optim.lr=3e-4", "data.crop_size=[16,32,32]", "logging.progress=false"])
    assert cfg.optim.lr == 3e-4 and cfg.data.crop_size == (16, 32, 32) and cfg.logging.progress is False


def test_lr_schedule_warms_up_then_decays_by_cosine() -> None:
    f = [lr_lambda(s, total_steps=10, warmup=2, min_lr_ratio=0.1) for s in range(12)]
    assert f[:2] == pytest.approx([0.5, 1.0])
    assert f[2] == pytest.approx(1.0)
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[10] == f[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))


def test_deepspeed_config_takes_batch_accumulation_and_precision_from_the_recipe() -> None:
    cpu = deepspeed_config("zero2", micro_batch=3, grad_accum=2, world_size=4, grad_clip=0.5, on_gpu=False)
    assert (cpu["train_batch_size"], cpu["gradient_accumulation_steps"], cpu["gradient_clipping"]) == (24, 2, 0.5)
    assert cpu["bf16"] == {"enabled": False} and cpu["zero_optimization"]["stage"] == 2
    gpu = deepspeed_config("zero3", micro_batch=14, grad_accum=1, world_size=4, grad_clip=1.0, on_gpu=True)
    assert gpu["bf16"]["enabled"] is True
    with pytest.raises(FileNotFoundError, match="zero0, zero1, zero2, zero3"):
        deepspeed_config("zero9", micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0, on_gpu=False)


def test_every_shipped_recipe_builds_the_heads_its_objectives_read() -> None:
    from fvlm.losses import create_objective
    from pipelines.train.trainer import check_objective_heads, model_config_for

    for path in sorted((config_dir() / "train").glob("*.yaml")):
        cfg = load_recipe(path.stem)
        check_objective_heads([(s, create_objective(s.name, **s.options)) for s in cfg.objectives],
                              model_config_for(cfg))
    cfg = load_recipe("fvlm-region")
    objectives = [(s, create_objective(s.name, **s.options)) for s in cfg.objectives]
    no_heads = model_config_for(load_recipe("fvlm-region", ["model.heads={}"]))
    with pytest.raises(ValueError, match=r"objective 'region_contrastive' reads .* head\(s\) region"):
        check_objective_heads(objectives, no_heads)
