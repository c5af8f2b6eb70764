"""``fvlm train``: train a recipe on a preprocess output folder, on one process or under a launcher."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from configs.paths import presets_help
from pipelines.help import lazy_epilog, recipe_parts

log = logging.getLogger(__name__)

EXAMPLE = """example:
  fvlm train --config tiny --data data/prep --output runs/tiny --max-steps 20
  fvlm train --config fvlm-disease --data data/prep --output runs/fvlm --resume
  torchrun --nproc_per_node 4 $(which fvlm) train --config fvlm --data data/prep --output runs/fvlm
  deepspeed --hostfile hostfile $(which fvlm) train --config fvlm --data /shared/prep --output /shared/runs/fvlm \\
      --deepspeed-config zero2
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an fVLM / CLIP recipe on preprocessed cases (DeepSpeed, one CPU to many GPU nodes)",
        description="Train the recipe on the cases of a preprocess output folder. Runs as one process as is, "
        "or on several under torchrun or the deepspeed launcher (RANK/WORLD_SIZE/LOCAL_RANK from the "
        "environment). Writes the resolved config, metrics.jsonl, TensorBoard scalars, atomic checkpoints "
        "and a final model export (RUN/model) to the output folder.",
        epilog=EXAMPLE + f"recipes: {presets_help('train')} or a YAML file;\n"
        f"DeepSpeed configs: {presets_help('deepspeed', '.json')} or a JSON file.\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lazy_epilog(p, lambda: "\nWhat a recipe can name (registered; fvlm.registry):\n" + recipe_parts())
    p.add_argument("--config", required=True, help="recipe: a name in configs/train or a YAML file")
    p.add_argument("--data", required=True, type=Path, help="preprocess output folder (fvlm preprocess OUT)")
    p.add_argument("--output", required=True, type=Path, help="run folder (created; reused by --resume)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (the LR schedule still follows the recipe)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (starts fresh if there is none)")
    p.add_argument("--deepspeed-config", default=None,
                   help="zero0..zero3 or a JSON file (default: the recipe's 'deepspeed')")
    p.add_argument("--workers", type=int, default=None, help="loader workers per process (default: the recipe's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set optim.lr=3e-4 --set data.batch_size=8 (repeatable)")
    p.set_defaults(func=run)


def _load_recipe(config: str, overrides: list[str]) -> object:
    """:func:`load_recipe`; an error caused by a ``--set`` is blamed on that ``--set``, not on the recipe file."""
    from pipelines.config.recipe import RecipeError, load_recipe

    try:
        return load_recipe(config, overrides)
    except RecipeError as e:
        if not overrides:
            raise
        try:
            load_recipe(config)
        except RecipeError:
            raise e from None  # the recipe itself is at fault
        for k in range(len(overrides)):
            try:
                load_recipe(config, overrides[: k + 1])
            except RecipeError as bad:
                detail = str(bad).split(": ", 1)[-1]
                raise RecipeError(f"--set {overrides[k]}: {detail}") from None
        raise


def run(args: argparse.Namespace) -> int:
    from fvlm import distributed as dist_utils
    from pipelines.train.engine import setup_distributed
    from pipelines.train.trainer import Trainer, build_data, build_tokenizer, model_config_for

    cfg = _load_recipe(args.config, args.overrides)  # fails before any process group exists
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    if not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such folder (give an fvlm preprocess output folder)")
    trainer = None
    setup_distributed()
    try:
        model_cfg = model_config_for(cfg)
        try:
            tokenizer = build_tokenizer(model_cfg, args.data, args.output)
        except ValueError as e:
            if "no non-empty text" not in str(e):
                raise
            raise ValueError(f"--data {args.data}: its cases hold no report text to train the tokenizer on (was it "
                             "preprocessed without --reports?); re-run fvlm preprocess with --reports TABLE, or "
                             "name a tokenizer in the recipe (model.text.tokenizer)") from None
        if not model_cfg.text.pretrained:
            model_cfg = model_cfg.replace(text={"vocab_size": len(tokenizer)})
        from fvlm.model.heads import data_extras_for

        data = build_data(cfg, args.data, tokenizer, cfg.data.max_text_len or model_cfg.text.max_length,
                          extras=data_extras_for(model_cfg), windows_hu=model_cfg.vision.input_windows_hu)
        trainer = Trainer(cfg, args.output, data=data, tokenizer=tokenizer, model_config=model_cfg,
                          deepspeed=args.deepspeed_config, max_steps=args.max_steps, resume=args.resume,
                          workers=args.workers)
        summary = trainer.train()
        if dist_utils.is_main_process():
            print(f"trained {summary['step']} steps ({summary['samples_per_s']:.2f} samples/s); "
                  f"model: {args.output / 'model'}")
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        dist_utils.destroy()
