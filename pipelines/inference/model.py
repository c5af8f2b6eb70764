"""The trained model as evaluation and prediction run it: the export, its tokenizer and the run's view.

:func:`load_model` loads an export (a run folder's ``model/`` or the export folder itself) with a clear error
for another architecture or a missing tokenizer; :func:`data_view` is the crop size and mode the model sees
(explicit options, else the run's recipe ``RUN/config.yaml``, else the model's input size and a central crop);
:func:`eval_dataset` the deterministic ``CaseDataset(train=False)`` of a preprocess folder in that view, the
input of ``fvlm evaluate``, its linear probe and ``fvlm embed``. ``fvlm predict`` builds the same view of one
in-memory crop through the same :func:`pipelines.cases.view.case_view`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def resolve_model_dir(checkpoint: Path) -> Path:
    """RUN/model when ``checkpoint`` is a training run folder, else the folder itself."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such folder (give a run folder or a model export)")
    if (checkpoint / "model" / "config.json").is_file():
        return checkpoint / "model"
    if (checkpoint / "config.json").is_file():
        return checkpoint
    raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a model export (config.json) nor a run folder "
                            "with model/config.json")


def load_model(checkpoint: Path) -> tuple[Any, Any, Path]:
    """(model, tokenizer, export folder) of a run folder or an export; ValueError for a checkpoint of another
    architecture, FileNotFoundError for an export without its tokenizer."""
    from fvlm.model import load_pretrained

    folder = resolve_model_dir(checkpoint)
    try:
        model, tok = load_pretrained(folder)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder}: not a checkpoint of the fvlm architecture ({e})") from e
    except RuntimeError as e:  # torch's load_state_dict: shapes of another architecture
        if "size mismatch" not in str(e) and "state_dict" not in str(e):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ValueError(f"{folder}: the weights do not fit the architecture in config.json (a checkpoint of "
                         f"another architecture?): {'; '.join(lines[:3]) or e}") from e
    if tok is None:
        raise FileNotFoundError(f"{folder}: the export has no tokenizer/ folder; zero-shot prompts need it")
    return model, tok, folder


def data_view(checkpoint: Path, model: Any, mode: str | None, crop_size: tuple[int, int, int] | None) -> dict:
    """Crop size and mode: explicit options, else the run's recipe (RUN/config.yaml), else the model's size."""
    cfg_mode, cfg_size, source = "crop", tuple(model.config.vision.image_size), "model image_size, central crop"
    run_cfg = Path(checkpoint) / "config.yaml"
    if run_cfg.is_file():
        from pipelines.config.recipe import load_recipe

        rec = load_recipe(run_cfg)  # a run's recipe that does not load is an error, not a silent fallback
        cfg_mode, cfg_size, source = rec.data.mode, tuple(rec.data.crop_size), f"recipe {run_cfg.name}"
    return {"mode": mode or cfg_mode, "crop_size_zyx": list(crop_size or cfg_size),
            "source": "command line" if (mode or crop_size) else source}


def eval_dataset(data: Path, tok: Any, model: Any, view: dict, seed: int, min_inside: float,
                 option: str = "--data") -> Any:
    """``CaseDataset(train=False)`` of a preprocess folder in the evaluation's ``view``, checked against the
    model's anatomies; cases with labels but no report are kept (scoring reads only the image)."""
    from pipelines.cases.dataset import CaseDataset
    from pipelines.cases.format import read_index

    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{option} {data}: no such folder (give an fvlm preprocess output folder)")
    if not list(data.glob("index*.jsonl")) or not read_index(data):
        raise ValueError(f"{option} {data}: no cases (no index.jsonl rows); run `fvlm preprocess` first")
    ds = CaseDataset(data, tok, crop_size_zyx=view["crop_size_zyx"], mode=view["mode"], train=False,
                     max_text_len=int(model.config.text.max_length or 64), seed=seed,
                     min_visible_fraction=min_inside, allow_label_only=True,
                     windows_hu=model.config.vision.input_windows_hu)
    if ds.anatomy_names and list(model.config.anatomy_names or ds.anatomy_names) != ds.anatomy_names:
        raise ValueError(f"{option} {data}: the model's anatomies {list(model.config.anatomy_names)} differ from "
                         f"the data's {ds.anatomy_names}")
    if ds.num_anatomies != model.config.num_anatomies:
        raise ValueError(f"{option} {data}: the data has {ds.num_anatomies} anatomies, the model "
                         f"{model.config.num_anatomies}")
    return ds
