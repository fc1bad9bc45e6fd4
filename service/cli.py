"""The ``diml`` command: one entry point whose subcommands come from each package."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from index_builder.cli import add_index
from model import configure_decoders
from model.cli import add_explain
from model.train_cli import add_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diml",
        description="Interpretable image retrieval by structural matching (DIML).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_explain(commands)
    add_training(commands)
    add_index(commands)
    add_serve(commands)
    return parser


def add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Serve /search, /explain, /gallery, /healthz, /readyz, /metrics and /docs. "
        "Every setting can also come from the environment (DIML_INDEX, DIML_CHECKPOINT, "
        "DIML_DEVICE, DIML_READ_KEYS, DIML_WRITE_KEYS, DIML_MAX_UPLOAD_BYTES, ...).",
    )
    p.add_argument("--index", help="the index: a folder, qdrant://HOST[:PORT]/COLLECTION or "
                   "qdrant-local:PATH (default $DIML_INDEX or gallery.index)")  # fmt: skip
    p.add_argument(
        "--gallery",
        type=Path,
        help="folder of images to index on the first start, when INDEX holds no index yet "
        "(default $DIML_GALLERY)",
    )
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the default model)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Check the settings, then serve. Settings that could not take effect, or name what is not
    there, refuse to start (exit 2) with one line each saying what to change."""
    from service.app import create_app
    from service.server import serve
    from service.settings import Settings
    from service.startup import startup_problems

    overrides = {
        name: value
        for name, value in (
            ("index", args.index),
            ("gallery", args.gallery),
            ("checkpoint", args.checkpoint),
            ("device", args.device),
        )
        if value is not None
    }
    try:
        settings = Settings(**overrides)
        problems = startup_problems(settings)
    except ValidationError as e:
        problems = _validation_problems(e)
    except ValueError as e:
        problems = [str(e)]
    for problem in problems:
        print(f"diml serve: {problem}", file=sys.stderr)
    if problems:
        return 2
    serve(create_app(settings), settings, args.host, args.port)
    return 0


FLAGS = {"index": "--index", "gallery": "--gallery", "checkpoint": "--checkpoint",
         "device": "--device"}  # fmt: skip


def _validation_problems(error: ValidationError) -> list[str]:
    """pydantic's refusals, one line each, naming the setting as the user gives it (flag and
    variable) without pydantic's decoration; an API key is never repeated."""
    problems = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["loc"]:
            field = str(item["loc"][0])
            name = f"DIML_{field.upper()}"
            name = f"{FLAGS[field]} ({name})" if field in FLAGS else name
            shown = "" if field.endswith("_keys") else f" {item['input']!r}"
            message = f"{name}{shown}: {message}"
        problems.append(message)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    configure_decoders()
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        print(
            f"\ndiml {args.command}: interrupted; what was committed is kept (an index build "
            "resumes when the same command runs again)",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # the reader went away (`diml index info --json | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second one at exit
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
