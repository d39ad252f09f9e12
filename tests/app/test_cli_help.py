"""``cskd-ray --help`` and every subcommand's ``--help``: one line each, examples, no reST markup."""

from __future__ import annotations

import argparse
import re

import pytest

from cskd_ray.app.cli import COMMANDS, build_parser, main
from cskd_ray.app.cli_help import COMMANDS as HELP


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*path, name), *_subcommands(sub, (*path, name))]
    return found


SUBCOMMANDS = _subcommands(build_parser())


def _help(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_command_has_a_runner_and_a_help_entry() -> None:
    top = {path[0] for path in SUBCOMMANDS}
    assert top == set(COMMANDS) and {" ".join(p) for p in SUBCOMMANDS} == set(HELP)
    assert {"push", "config show", "predict", "score"} <= set(HELP)


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=" ".join)
def test_subcommand_help_has_a_description_and_examples(path: tuple[str, ...], capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = _help(list(path), capsys, monkeypatch)
    line, examples = HELP[" ".join(path)]
    assert f"\n{line[0].upper()}{line[1:]}.\n" in out
    assert "\nexamples:\n" in out and examples and all(f"  {example}\n" in out for example in examples)
    assert all(example.startswith("cskd-ray ") or "| cskd-ray " in example for example in examples)
    assert "``" not in out and ":func:" not in out


def test_top_level_help_lists_each_command_on_one_line(capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = _help([], capsys, monkeypatch)
    assert "``" not in out and ":mod:" not in out and "example" in out
    for name in COMMANDS:
        assert re.search(rf"^    {re.escape(name)} +{re.escape(HELP[name][0])}$", out, re.M), name
    assert "argcomplete" in out  # says how to get shell completion (not built in)
