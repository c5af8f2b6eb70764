"""The ``fvlm`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module under ``pipelines/`` and exposes ``register(subparsers)``, which
adds its parser (with an example in the epilog) and sets ``func`` to a thin function that parses, builds
and calls into the packages. Only subcommands that work are listed in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Sequence

#: Subcommand modules, in the order ``fvlm --help`` lists them.
SUBCOMMANDS: tuple[str, ...] = ("pipelines.synth.command", "pipelines.preprocess.command", "pipelines.parse_reports",
                                "pipelines.train.command", "pipelines.evaluate.command", "pipelines.downstream.embed",
                                "pipelines.downstream.probe", "pipelines.downstream.retrieve",
                                "pipelines.predict.command", "pipelines.demo.command")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fvlm",
        description="Anatomy-level vision-language pre-training on 3D CT (fVLM).",
        epilog="Run 'fvlm COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Input errors: one clear line, no traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"fvlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Disk full (e.g. a checkpoint save): one line naming what was written and what is intact; exit 1.
        if e.errno != errno.ENOSPC or args.verbose:
            raise
        print(f"fvlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fvlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
