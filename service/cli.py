"""The ``diml`` command: one entry point whose subcommands come from each package."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from index_builder.cli import add_index
from model.cli import add_explain


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diml",
        description="Interpretable image retrieval by structural matching (DIML).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_explain(commands)
    add_index(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        print(
            f"\ndiml {args.command}: interrupted; what was committed is kept (an index build "
            "resumes when the same command runs again)",
            file=sys.stderr,
        )
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
