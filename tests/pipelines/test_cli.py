"""The `fvlm` entry point: every registered subcommand has help with a runnable-looking example."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pipelines.cli import build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_subcommands_registered() -> None:
    assert "synth" in _subparsers()


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_every_subcommand_has_an_example(name: str) -> None:
    sub = _subparsers()[name]
    assert sub.epilog and "example" in sub.epilog and f"fvlm {name} " in sub.epilog
    assert sub.description


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


@pytest.mark.slow
def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "pipelines", "--help"], capture_output=True, text=True, check=True)
    assert "synth" in out.stdout


def test_help_lists_the_presets_in_configs() -> None:
    """Preset lists in the help are read from configs/, so a new recipe or demo config shows without an edit."""
    from configs.paths import config_dir

    subs = _subparsers()
    recipes = sorted(p.stem for p in (config_dir() / "train").glob("*.yaml"))
    assert recipes and all(r in subs["train"].epilog for r in recipes)
    demo_help = next(a.help for a in subs["demo"]._actions if a.dest == "config")
    assert all(p.stem in demo_help for p in (config_dir() / "demo").glob("*.yaml"))


def test_train_help_lists_every_registered_part_and_the_parser_does_not_import_torch() -> None:
    """The lists of objectives, heads, encoders, extras and scorers in ``fvlm train --help`` are read from the
    registries when the help is printed, so a newly registered entry shows without an edit; building the
    parser (every ``fvlm`` start) leaves torch unimported."""
    probe = ("import sys; from pipelines.cli import build_parser; build_parser(); "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

    from fvlm.losses.registry import OBJECTIVES
    from fvlm.model.heads import HEADS
    from fvlm.scoring import SCORERS
    from pipelines.train.extras import EXTRAS

    text = _subparsers()["train"].format_help()
    assert "fvlm train --config tiny" in text  # the static epilog is kept
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.strip()}
    for registry in (OBJECTIVES, HEADS, SCORERS, EXTRAS):  # entries other test modules registered included
        for name in registry.names():
            assert name in listed, f"{registry.kind} {name} missing from fvlm train --help"
