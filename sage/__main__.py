"""`python -m sage COMMAND`: the edge runtime's commands, one module each.

Each command module has `add_arguments(parser)` and `main(args) -> int`; to add a command, add a
line to COMMANDS. Bad input (a ValueError or OSError from any command) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sage import client, serve, stats

COMMANDS = {
    "serve": (serve, "answer HRM requests from a mailbox (batching, early halting, persistent carries)"),
    "stats": (stats, "show a server's counters, latency quantiles, queues (or its Prometheus text)"),
    "solve": (client, "solve a Sudoku with a running server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sage", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command][0].main(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
