"""Command-line flags generated from config dataclasses: each option is declared once.

A step's options live in one dataclass (``TrainJob``, ``EmbedConfig``, ``DownloadConfig``,
``FilterConfig``); each field carries its default and, in its metadata, its help text. The
flags are generated from the fields, so a default, a help text or a list of choices is never
written twice::

    @dataclass
    class EmbedConfig:
        max_length: int = option(128, "max tokens per caption (Imagen: 128)")

    add_options(parser, EmbedConfig)            # --max-length, type int, default 128
    EmbedConfig(**options_from_args(EmbedConfig, parser.parse_args()))

The flag of ``field_name`` is ``--field-name`` (or ``option(..., cli_name="--other")`` where
users already type another name); its type is the field's (``int | None`` gives ``type=int``;
a ``list[str]`` or ``tuple[str, ...]`` field gives ``type=str`` and needs ``nargs``, unless
``type=`` parses the whole value, e.g. :func:`comma_list`). A ``bool`` field defaulting to
False is an ``--name`` switch, one defaulting to True a ``--no-name`` switch; a field without a
default is a required flag; any other metadata (``choices``, ``metavar``, ``nargs``) goes to
argparse as is. The value always lands in ``args.<field_name>``. Imports nothing from
``pipeline``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_CLI_NAME = "_cli_name"  # metadata key: the flag's name when it is not --field-name


def option(default: Any = dataclasses.MISSING, help: str = "", *, cli_name: str | None = None,
           **argparse_kwargs: Any) -> Any:
    """A dataclass field with its default and its command-line help (``help`` required).
    ``cli_name``: the flag, when users know it by another name than ``--field-name``.
    ``argparse_kwargs``: ``choices``, ``metavar``, ``nargs``, ``type``... for the generated flag."""
    if not help:
        raise ValueError("option() needs help text: it is the flag's --help")
    meta = {"help": help, **argparse_kwargs, **({_CLI_NAME: cli_name} if cli_name else {})}
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """``checkpoint_dir`` -> ``--checkpoint-dir``."""
    return "--" + name.replace("_", "-")


def comma_list(text: str) -> tuple[str, ...]:
    """``"en,de"`` -> ``("en", "de")``: a ``type=`` for a tuple option typed as one word."""
    return tuple(x for x in text.split(",") if x)


def _value_type(hint: Any) -> Any:
    """``int | None`` -> int; ``str`` -> str; ``list[str]`` -> list[str] (see :func:`_item_type`)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        raise TypeError(f"option type {hint} is ambiguous on the command line")
    return hint


def _item_type(kind: Any) -> Any:
    """The element type of ``list[X]`` / ``tuple[X, ...]``; None for a plain type."""
    if typing.get_origin(kind) in (list, tuple):
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        if len(set(args)) == 1:
            return args[0]
        raise TypeError(f"option type {kind} is ambiguous on the command line")
    return None


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are options (those declared with :func:`option`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    """The flag a user types for option field ``f``: ``cli_name``, ``--no-name`` for a switch
    that is on by default, else ``--field-name``."""
    if _CLI_NAME in f.metadata:
        return f.metadata[_CLI_NAME]
    return flag(f"no_{f.name}") if f.default is True else flag(f.name)


def add_options(parser: argparse.ArgumentParser | Any, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per :func:`option` field of ``cls`` (except ``skip``) to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in option_fields(cls):
        if f.name in skip:
            continue
        extra = {k: v for k, v in f.metadata.items() if k != "help" and not k.startswith("_")}
        extra.update(dest=f.name, help=f.metadata["help"])
        kind = _value_type(hints[f.name])
        if kind is bool:
            if f.default not in (False, True):
                raise TypeError(f"{cls.__name__}.{f.name}: a bool option defaults to False or True")
            # on by default: the flag turns it off (--no-dedup), as users expect of such switches
            parser.add_argument(flag_of(f), action="store_false" if f.default else "store_true", **extra)
            continue
        if f.default is dataclasses.MISSING:
            extra["required"] = True
        else:
            extra["default"] = f.default
        item = _item_type(kind)
        if item is not None and "type" not in extra and "nargs" not in extra:
            raise TypeError(f"{cls.__name__}.{f.name}: a {kind} option needs nargs= or a type= that "
                            "parses the whole value")
        kind = item if item is not None else kind
        if kind is not str and "type" not in extra:
            extra["type"] = kind
        parser.add_argument(flag_of(f), **extra)


def options_from_args(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{field: value}`` of ``cls``'s options parsed into ``args``."""
    return {f.name: getattr(args, f.name) for f in option_fields(cls)
            if f.name not in skip and hasattr(args, f.name)}
