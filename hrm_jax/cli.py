"""What every command-line entry point shares: one-line errors, logging set-up, argument types, and
flags generated from the configuration dataclasses.

Used by experiments/ (the task CLIs), export/ (python -m export) and benchmarks/. Flags come from
`dataclasses.fields`: `--global-batch-size` sets OptimConfig.global_batch_size; the field's type
gives the flag's type, a Literal its choices, and the field's metadata["help"] its help. A bool field
is a switch (`--resume`; `--no-progress` where the default is on). A flag not given leaves no
attribute (argparse.SUPPRESS), so that `config_from_flags` changes only what was given and keeps
the preset's value otherwise (even where a given value is None, as `--devices all`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import jax


class CLIError(ValueError):
    """A bad command-line argument: printed as one line, exit code 2."""


def cli_main(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wraps a CLI's main so that expected errors (bad input, data, checkpoints, a batch too large
    for the device) print one line.

    Every error class the package raises for bad input derives from ValueError or OSError; a
    traceback is kept only for real bugs (anything else).
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except jax.errors.JaxRuntimeError as error:
            if not is_out_of_memory(error):
                raise
            print(f"error: {out_of_memory_message(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
            return 130

    return wrapper


def is_out_of_memory(error: Exception) -> bool:
    """XLA's allocation failure (the same status on CPU and GPU)."""
    return "RESOURCE_EXHAUSTED" in str(error)


def out_of_memory_message(error: Exception) -> str:
    """What ran out, how much was asked for, and the flags that make a run fit."""
    device = jax.devices()[0]
    # XLA:CPU says "allocating N bytes", XLA:GPU "allocate N bytes".
    asked = re.search(r"allocat(?:e|ing) (\d+) bytes", str(error))
    amount = f" (an allocation of {int(asked.group(1)) / 2**30:.1f} GiB failed)" if asked else ""
    return (f"out of memory on {device.platform} device {device.device_kind!r}{amount}. Use smaller batches "
            "(train: --global-batch-size, --eval-batch-size or a smaller --preset; eval: --batch-size), split "
            "them over more GPUs (--devices N), or a device with more memory. Files already written are kept: "
            "train --resume continues from the last checkpoint")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # orbax and absl are chatty at INFO.
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)


# Argument types ------------------------------------------------------------------------------
def _int_at_least(text: str, minimum: int) -> int:
    value = int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def device_count(text: str) -> int | None:
    """argparse type: a positive integer, or 'all' (None: every local device)."""
    return None if text == "all" else _int_at_least(text, 1)


# Flags from dataclass fields -------------------------------------------------------------------
# Where a flag's name or type is not the field's own (kept so that existing command lines work).
FLAG_NAMES = {"out_dir": "out"}
FLAG_TYPES: dict[str, Callable[[str], Any]] = {"devices": device_count, "out_dir": str}
_METAVARS = {"devices": "N|all", "out_dir": "DIR", "coordinator": "HOST:PORT", "coordinator_timeout": "SECONDS",
             "heartbeat_timeout": "SECONDS"}


def _flag(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


def _scalar_type(hint: Any) -> Any:
    """int for `int | None`, the Literal for a Literal, the type itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_class: type, *,
                     only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> None:
    """One flag per field of `config_class` (or of `only`), minus `exclude`; see the module docstring."""
    hints = typing.get_type_hints(config_class)
    wanted = None if only is None else set(only)
    for field in dataclasses.fields(config_class):
        if (wanted is not None and field.name not in wanted) or field.name in exclude:
            continue
        hint = _scalar_type(hints[field.name])
        help_text = field.metadata.get("help")
        if hint is bool:
            switch = _flag(field.name) if field.default is False else "--no-" + _flag(field.name)[2:]
            parser.add_argument(switch, dest=field.name, action="store_const", const=not field.default,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(_flag(field.name), dest=field.name, choices=typing.get_args(hint),
                                default=argparse.SUPPRESS,
                                help=f"{help_text} (default {field.default})" if help_text else None)
        else:
            kind = FLAG_TYPES.get(field.name, hint)
            parser.add_argument(_flag(field.name), dest=field.name, type=kind, default=argparse.SUPPRESS,
                                help=help_text,
                                metavar=_METAVARS.get(field.name, getattr(kind, "__name__", "X").upper()))


def config_from_flags(base: Any, args: argparse.Namespace, *, only: Iterable[str] | None = None) -> Any:
    """`base` with the fields whose flags were given replaced."""
    names = [f.name for f in dataclasses.fields(base) if only is None or f.name in set(only)]
    changes = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return dataclasses.replace(base, **changes)
