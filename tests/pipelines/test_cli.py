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


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "pipelines", "--help"], capture_output=True, text=True, check=True)
    assert "synth" in out.stdout
