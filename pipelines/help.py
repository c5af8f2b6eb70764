"""CLI help text built from the registries (``fvlm.registry.Registry``), so the lists of what a recipe can
name never go stale.

The registries live in modules that import torch; the CLI starts without it (``fvlm --help`` and
``fvlm synth`` stay fast). :func:`lazy_epilog` therefore adds these lists to a parser's epilog only when its
help is printed.
"""

from __future__ import annotations

import argparse
from typing import Callable


def lazy_epilog(parser: argparse.ArgumentParser, build: Callable[[], str]) -> None:
    """Append ``build()`` to ``parser``'s epilog the first time its help is formatted (not at start-up)."""
    format_help = parser.format_help

    def _format_help() -> str:
        parser.epilog = (parser.epilog or "") + build()
        parser.format_help = format_help  # type: ignore[method-assign]
        return format_help()

    parser.format_help = _format_help  # type: ignore[method-assign]


def recipe_parts() -> str:
    """What a recipe's sections can name, one block per registry: the registered name and its one-line help.

    ::

        objectives (objectives: [{name: NAME, weight: W, options: {...}}]):
          anatomy_contrastive      Per-anatomy symmetric soft-target InfoNCE ...
    """
    from fvlm.losses.registry import OBJECTIVES
    from fvlm.model.heads import HEADS
    from fvlm.model.registry import TEXT_ENCODERS, VISION_ENCODERS
    from fvlm.scoring import SCORERS
    from pipelines.train.extras import EXTRAS

    blocks = [("objectives (objectives: [{name: NAME, weight: W, options: {...}}])", OBJECTIVES),
              ("heads (model.heads: {NAME: {options}})", HEADS),
              ("vision encoders (model.vision.name)", VISION_ENCODERS),
              ("text encoders (model.text.name)", TEXT_ENCODERS),
              ("dataset extras (asked for by the heads and objectives a recipe names)", EXTRAS),
              ("zero-shot scorers (declared by the recipe's objectives and heads)", SCORERS)]
    return "".join(f"{title}:\n" + "\n".join(reg.help_lines()) + "\n" for title, reg in blocks)
