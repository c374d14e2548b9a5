"""`python -m sage COMMAND ...`: one subcommand per entry of COMMANDS.

Each entry names a module with `add_arguments(parser)` and `main(args) -> exit code`; only the chosen
command's module is imported, so a command that needs no JAX (e.g. serving through another backend)
starts without it. Bad input (a ValueError or OSError from a command) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS = {
    "serve": ("sage.serve", "answer HRM requests from a mailbox (batching, early halting, persistent carries)"),
    "stats": ("sage.stats", "show a server's counters, latency quantiles and queues, or its Prometheus text"),
    "solve": ("sage.client", "solve a Sudoku with a running server"),
    "sleep": ("sage.sleep", "fine-tune the served weights on salient experiences; publish them if they validate"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m sage", description="SAGE, the edge runtime around HRM.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:
            try:
                importlib.import_module(module).add_arguments(sub)
            except ImportError as err:
                print(f"python -m sage {name}: {err}", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return importlib.import_module(COMMANDS[args.command][0]).main(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
