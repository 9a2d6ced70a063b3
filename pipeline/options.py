"""Command-line flags generated from config dataclasses: each option is declared once.

A step's options live in one dataclass (``TrainJob``, ``EmbedConfig``); each field carries its
default and, in its metadata, its help text. The flags are generated from the fields, so a
default or a help text is never written twice::

    @dataclass
    class EmbedConfig:
        max_length: int = option(128, "max tokens per caption (Imagen: 128)")

    add_options(parser, EmbedConfig)            # --max-length, type int, default 128
    EmbedConfig(**options_from_args(EmbedConfig, parser.parse_args()))

The flag of ``field_name`` is ``--field-name``; its type is the field's (``int | None`` gives
``type=int``), a ``bool`` field is an ``action="store_true"`` flag, a field without a default
is a required flag, and any other metadata (``choices``, ``metavar``) goes to argparse as is.
Imports nothing from ``pipeline``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", **argparse_kwargs: Any) -> Any:
    """A dataclass field with its default and its command-line help (``help`` required).
    ``argparse_kwargs``: ``choices``, ``metavar``... for the generated flag."""
    if not help:
        raise ValueError("option() needs help text: it is the flag's --help")
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def flag(name: str) -> str:
    """``checkpoint_dir`` -> ``--checkpoint-dir``."""
    return "--" + name.replace("_", "-")


def _value_type(hint: Any) -> Any:
    """``int | None`` -> int; ``str`` -> str."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        raise TypeError(f"option type {hint} is ambiguous on the command line")
    return hint


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are options (those declared with :func:`option`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_options(parser: argparse.ArgumentParser | Any, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per :func:`option` field of ``cls`` (except ``skip``) to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in option_fields(cls):
        if f.name in skip:
            continue
        extra = {k: v for k, v in f.metadata.items() if k != "help" and not k.startswith("_")}
        kind = _value_type(hints[f.name])
        if kind is bool:
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool option must default to False")
            parser.add_argument(flag(f.name), action="store_true", help=f.metadata["help"], **extra)
            continue
        if f.default is dataclasses.MISSING:
            extra["required"] = True
        else:
            extra["default"] = f.default
        if kind is not str:
            extra["type"] = kind
        parser.add_argument(flag(f.name), help=f.metadata["help"], **extra)


def options_from_args(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{field: value}`` of ``cls``'s options parsed into ``args``."""
    return {f.name: getattr(args, f.name) for f in option_fields(cls)
            if f.name not in skip and hasattr(args, f.name)}
