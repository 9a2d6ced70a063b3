"""pipeline.options: flags generated from a config dataclass's fields, and parsed back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from pipeline.options import add_options, flag, option, options_from_args


@dataclass(kw_only=True)
class Example:
    name: str = option(help="required: no default")
    size: int | None = option(None, "an optional int")
    rate: float = option(0.5, "a float with a default")
    mode: str = option("a", "one of two", choices=["a", "b"])
    fast: bool = option(False, "a switch")
    internal: int = 3  # no option(): not a flag


def parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser()
    add_options(p, Example)
    return p, p.parse_args(argv)


def test_flags_types_defaults_and_round_trip():
    _, a = parse(["--name", "x", "--size", "3", "--fast"])
    assert (a.name, a.size, a.rate, a.mode, a.fast) == ("x", 3, 0.5, "a", True)
    assert not hasattr(a, "internal")
    assert Example(**options_from_args(Example, a)) == Example(name="x", size=3, fast=True)
    assert flag("checkpoint_dir") == "--checkpoint-dir"


def test_required_choices_and_help():
    p, _ = parse(["--name", "x"])
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "x", "--mode", "c"])
    assert "an optional int" in p.format_help()


def test_an_option_needs_help_and_a_switch_defaults_off():
    with pytest.raises(ValueError, match="needs help"):
        option(1)

    @dataclass
    class On:
        loud: bool = option(True, "cannot be turned off on the command line")

    with pytest.raises(TypeError, match="must default to False"):
        add_options(argparse.ArgumentParser(), On)
