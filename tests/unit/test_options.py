"""pipeline.options: flags generated from a config dataclass's fields, and parsed back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from pipeline.options import (
    add_options,
    comma_list,
    flag,
    flag_of,
    option,
    option_fields,
    options_from_args,
)


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


def test_an_option_needs_help():
    with pytest.raises(ValueError, match="needs help"):
        option(1)


@dataclass
class Renamed:
    dedup: bool = option(True, "on by default: the flag turns it off")
    number_sample_per_shard: int = option(10, "known to users by a shorter flag", cli_name="--samples-per-shard")
    columns: list[str] | None = option(None, "several words", nargs="*")
    languages: tuple[str, ...] = option((), "one comma-separated word", type=comma_list)


def test_switches_on_by_default_renamed_flags_and_sequences():
    p = argparse.ArgumentParser()
    add_options(p, Renamed)
    assert [flag_of(f) for f in option_fields(Renamed)] == [
        "--no-dedup", "--samples-per-shard", "--columns", "--languages"]
    a = p.parse_args([])
    assert Renamed(**options_from_args(Renamed, a)) == Renamed()  # the flags' defaults are the fields'
    a = p.parse_args(["--no-dedup", "--samples-per-shard", "3", "--columns", "x", "y", "--languages", "en,de"])
    assert options_from_args(Renamed, a) == {"dedup": False, "number_sample_per_shard": 3, "columns": ["x", "y"],
                                             "languages": ("en", "de")}


def test_a_sequence_option_needs_nargs_or_a_parser():
    @dataclass
    class Bare:
        columns: list[str] | None = option(None, "ambiguous on the command line")

    with pytest.raises(TypeError, match="needs nargs"):
        add_options(argparse.ArgumentParser(), Bare)
